"""Adapters that bring fastpref to users of other libraries: ``trl`` (a drop-in for TRL's ``DPOTrainer``)."""
