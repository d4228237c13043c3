"""Semi-supervised learning: the mean-teacher self-training method, the criteria that turn a
labeled + unlabeled batch into a loss, and Noisy Student's pseudo-label selection (its rounds run
as ``python -m ssl_kit.noisy_student``)."""

from ssl_kit.semi.criteria import (
    CRITERIA, DoublyRobustCriterion, FixMatchCriterion, FlexMatchCriterion, FreeMatchCriterion, SoftMatchCriterion,
)  # fmt: skip
from ssl_kit.semi.mean_teacher import MeanTeacher

__all__ = [
    "CRITERIA", "DoublyRobustCriterion", "FixMatchCriterion", "FlexMatchCriterion", "FreeMatchCriterion", "MeanTeacher",
    "SoftMatchCriterion",
]  # fmt: skip
