"""Fine-tuning ("none" in van de Ven & Tolias 2019): train each task in turn with no protection.

The lower bound of every CL table; the standard loop of `Method` is the whole algorithm (and, like it,
reports no diagnostics: `fit_task` returns {}).
"""
from . import METHODS, Method


@METHODS.register("finetune")
class Finetune(Method):
    pass
