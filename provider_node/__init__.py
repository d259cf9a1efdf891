"""The dcf provider: one process per machine or device, computing subtasks for the head."""
