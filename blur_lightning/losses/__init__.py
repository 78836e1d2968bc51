"""Forget and retain losses: functional forms, their registry, the loss context, NPO's cached reference."""
