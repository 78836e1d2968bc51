"""Files shipped inside the package (the embedded QA set), named "embedded:NAME" (blur_lightning.data.rows)."""
