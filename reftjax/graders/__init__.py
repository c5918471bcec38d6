"""Reward graders for ReFT and OpenAI-RFT-style configs, a program sandbox and the jit bridge.

Modules: `base` (Grade, Grader), `reft` (the ReFT authors' answer rules), `sandbox` (isolated
program execution), `openai` + `build` (config-driven graders), `judge` (model-based graders over
an OpenAI-compatible endpoint: judges, and the embeddings of `text_similarity`'s cosine), `guards`
(reward-hacking checks), `callback` (grading from inside `jax.jit`), `__main__` (CLI).
"""
from reftjax.graders.base import Grade, Grader, has_answer, parallel_grade
from reftjax.graders.build import (ConfigError, build_grader, check_imports, check_wordnet, reach_warnings,
                                   validate_grader)
from reftjax.graders.guards import GuardConfig
from reftjax.graders.judge import CosineGrader, ModelGrader, check_judges
from reftjax.graders.reft import ReftGrader, reft_target
from reftjax.graders.sandbox import SandboxConfig, SandboxPool

__all__ = ["ConfigError", "CosineGrader", "Grade", "Grader", "GuardConfig", "has_answer", "ModelGrader", "ReftGrader",
           "SandboxConfig", "SandboxPool", "build_grader", "check_imports", "check_judges", "check_wordnet",
           "parallel_grade", "reach_warnings", "reft_target", "validate_grader"]
