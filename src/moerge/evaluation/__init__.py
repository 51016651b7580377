"""Evaluation: task suites from offline data, scoring, and (to come) the expert zoo and reports.

See ``tasks`` (the task registry and splits) and ``scoring`` (label log-likelihood scoring).
"""
