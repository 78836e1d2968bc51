"""Files shipped inside the package (the embedded QA set), addressed as "embedded:NAME" (see blur_lightning.rows)."""
