"""Joint training (the offline upper bound): one training run on all tasks' data together.

The engine sees `trains_jointly` and hands `fit_task` a single task holding every task's training
data; the accuracy matrix then has one row, evaluated per task. No diagnostics: `fit_task` returns {}.
"""
from . import METHODS, Method


@METHODS.register("joint")
class Joint(Method):
    trains_jointly = True
