"""Evaluation: metrics, the teacher-forced comparison against the cached baseline, lm-eval tasks, and the
sandbox that runs model-written code."""
from qkit.evaluation.teacher_forced import (  # noqa: F401  (the package's public names)
    TASK_PREFIX,
    Baseline,
    EvalSpec,
    baseline,
    compare,
    eval_chunks,
    final_hidden,
    head_logits,
)
