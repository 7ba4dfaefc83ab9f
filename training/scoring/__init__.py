"""Scores of a fitted model: metrics, plots, and the confidence (calibration, prediction sets) it will serve."""
