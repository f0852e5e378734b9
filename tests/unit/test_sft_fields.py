"""The `training` section's field list, read from TRL's source, is exactly SFTConfig's."""

from __future__ import annotations

import dataclasses

from launcher import sft_fields


def test_fields_match_sftconfig():
    from trl import SFTConfig

    real = {f.name: f for f in dataclasses.fields(SFTConfig)}
    parsed = sft_fields.fields()
    assert parsed.keys() == real.keys()
    for name, field in real.items():
        default = parsed[name].default
        if field.default is not dataclasses.MISSING and default is not sft_fields.NO_DEFAULT:
            assert default == field.default, name


def test_kinds_of_common_fields():
    fields = sft_fields.fields()
    assert {"float", "int"} <= fields["learning_rate"].kinds
    assert fields["per_device_train_batch_size"].kinds == {"int"}
    assert "none" in fields["max_length"].kinds
    assert "bool" in fields["assistant_only_loss"].kinds
