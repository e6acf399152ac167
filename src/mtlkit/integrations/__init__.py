"""Integrations with the libraries users already train with, each behind its own extra and imported
explicitly (``from mtlkit.integrations.lightning import MultiTaskLightningModule``), so ``import
mtlkit`` needs none of them."""
