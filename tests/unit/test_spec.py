from pathlib import Path

import pytest

from driftloop.demo_data import DEMO_SPEC
from driftloop.errors import SpecError
from driftloop.schema import build_schema
from driftloop.spec import load_spec, parse_spec
from tests.support.data import LOAN_SPEC, write_spec


def test_spec_derives_every_column_list(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path))
    assert spec.feature_columns == ["amount", "ratio", "band", "prev_ok", "term"]
    assert list(spec.schema_columns(labelled=True)) == [
        "id", "ts", "amount", "ratio", "band", "prev_ok", "term", "repaid",
    ]
    assert "repaid" not in spec.schema_columns(labelled=False)
    assert spec.column_spec("id").unique  # ids are unique even when not declared so
    assert spec.column_spec("repaid").allowed == [0, 1]  # implied binary target
    assert set(build_schema(spec).columns) == set(spec.schema_columns())


def test_features_default_to_all_but_roles(tmp_path: Path) -> None:
    spec = load_spec(write_spec(tmp_path, {"features": None}))
    assert spec.feature_columns == ["amount", "ratio", "band", "prev_ok", "term"]


def test_issue_example_spec_with_undeclared_roles_loads() -> None:
    spec = parse_spec(
        {
            "name": "car_loan", "task": "binary_classification", "target": "repaid", "id": "id",
            "timestamp": "timestamp", "segment": "salary_range", "max_reject_fraction": 0.05,
            "columns": {
                "car_value": {"dtype": "float", "min": 0},
                "salary_range": {"dtype": "category", "allowed": ["0 - 20K €", "60K+ €"]},
                "repaid_loan_on_prev_car": {"dtype": "bool"},
                "debt_to_income_ratio": {"dtype": "float", "min": 0, "max": 1, "nullable": True},
            },
        }
    )
    assert spec.column_spec("timestamp").dtype == "datetime"
    assert spec.column_spec("id").dtype == "string"
    assert len(spec.feature_columns) == 4


def test_demo_spec_is_valid() -> None:
    spec = load_spec(DEMO_SPEC)
    assert spec.name == "car_loan" and len(spec.feature_columns) == 7


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"colour": "red"}, "key 'colour': unknown key"),
        ({"task": "clustering"}, "key 'task': 'clustering' is not allowed"),
        ({"columns": {**LOAN_SPEC["columns"], "amount": {"dtyp": "float"}}}, "key 'columns.amount.dtyp': unknown key"),
        ({"columns": {**LOAN_SPEC["columns"], "amount": {"dtype": "decimal"}}}, "key 'columns.amount.dtype': 'decimal' is not allowed"),
        ({"columns": {**LOAN_SPEC["columns"], "amount": {"dtype": "float", "min": 5, "max": 1}}}, "min (5.0) is greater than max (1.0)"),
        ({"features": ["amount", "nope"]}, "features ['nope'] are not declared"),
        ({"features": ["amount", "id"]}, "the id column 'id' cannot also be a feature"),
        ({"segment": "region"}, "segment 'region' is not declared"),
        ({"max_reject_fraction": 1.5}, "key 'max_reject_fraction'"),
        ({"name": "Bad Name"}, "key 'name'"),
    ],
)
def test_invalid_spec_names_file_and_key(tmp_path: Path, overrides: dict, expected: str) -> None:
    path = write_spec(tmp_path, overrides)
    with pytest.raises(SpecError) as err:
        load_spec(path)
    assert str(path) in str(err.value)
    assert expected in str(err.value)


def test_missing_required_key(tmp_path: Path) -> None:
    spec = dict(LOAN_SPEC)
    del spec["target"]
    path = tmp_path / "s.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match="key 'target': required key is missing"):
        load_spec(path)


def test_unreadable_specs(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: [unclosed\n")
    with pytest.raises(SpecError, match=r"broken.yaml: invalid YAML at line"):
        load_spec(broken)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="expected a mapping"):
        load_spec(listing)
