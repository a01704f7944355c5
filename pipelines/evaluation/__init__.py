"""Scoring predictions against ground truth (pycocotools' exact numbers) and the reports users read."""
