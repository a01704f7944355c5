"""Bulk detection on Ray Data: plan and units of work, detector actors, prediction parts."""
