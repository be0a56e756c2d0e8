"""Data: source readers, the decoded uint8 cache, tensor augmentation and the LightningDataModule."""
