"""Priority classes at the edge: a key's class comes from ``ingress.key_priorities``; a request may
ask for its key's class or a lower one (``priority``), and anything else is a 422 naming ``priority``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from serve.config import IngressSettings
from serve.edge.errors import FieldError
from serve.edge.intake import task_priority
from serve.schemas import GenerateRequest


def test_a_request_takes_its_keys_class_or_a_lower_one():
    assert task_priority(None, "high") == 2 and task_priority(None, "normal") == 1
    assert task_priority("low", "normal") == 0 and task_priority("high", "high") == 2


def test_a_class_above_the_keys_is_a_422_naming_priority_and_the_allowed_classes():
    with pytest.raises(FieldError) as refused:
        task_priority("high", "normal")
    assert refused.value.status_code == 422 and refused.value.loc == ["body", "priority"]
    assert "allowed: low, normal" in refused.value.message
    with pytest.raises(FieldError, match="allowed: low$"):
        task_priority("normal", "low")


def test_the_request_model_and_the_config_know_only_the_class_names():
    assert GenerateRequest(priority="low").priority == "low" and GenerateRequest().priority is None
    with pytest.raises(ValidationError, match="priority"):
        GenerateRequest(priority="urgent")
    assert IngressSettings(key_priorities={"alice": "high"}).key_priorities == {"alice": "high"}
    with pytest.raises(ValidationError, match="key_priorities"):
        IngressSettings(key_priorities={"alice": "urgent"})
