"""Online drafter training and delivery; `OnlineDrafter` wires the loop for a user."""

from tlt.drafter_sync.online import OnlineDrafter

__all__ = ["OnlineDrafter"]
