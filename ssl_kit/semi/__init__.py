"""Semi-supervised learning: self-training methods (mean teacher, Noisy Student rounds) and the
criteria that turn a labeled + unlabeled batch into a loss."""

from ssl_kit.semi.criteria import CRITERIA, DoublyRobustCriterion, FixMatchCriterion
from ssl_kit.semi.mean_teacher import MeanTeacher

__all__ = ["CRITERIA", "DoublyRobustCriterion", "FixMatchCriterion", "MeanTeacher"]
