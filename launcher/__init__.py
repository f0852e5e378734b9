"""Recipe-driven DeepSpeed ZeRO launcher for TRL supervised fine-tuning."""

__version__ = "0.1.0"
