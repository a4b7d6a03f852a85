"""The cross-check itself catches what it is there for (so a pass means something)."""

from __future__ import annotations

import pytest

from tests.deploy.support import check_place, metric_names


@pytest.mark.parametrize(
    ("commands", "variables", "shared", "complaint"),
    [
        ([["relay", "--nope"]], [], [], "has no option --nope"),
        ([["consumer", "x:y"]], [], [], "is not a postroom command"),
        ([["db"]], [], [], "is not a postroom command"),
        ([["relay"]], ["POSTROOM_RELAY_BATCHBYTES"], [], "is no postroom setting"),
        ([["consume", "x:y"]], ["POSTROOM_RELAY_ID"], [], "is read by none of ['consume']"),
        ([["db", "upgrade"]], [], ["POSTROOM_DATABASE_ULR"], "is no postroom setting"),
        ([["db", "upgrade"]], ["POSTROOM_KAFKA_SASL_PASSWORD"], [], "is read by no command"),
    ],
)
def test_it_refuses_what_the_cli_does_not_have(
    commands: list[list[str]], variables: list[str], shared: list[str], complaint: str
) -> None:
    with pytest.raises(AssertionError) as refused:
        check_place("here", commands, variables, shared=shared)
    assert complaint in str(refused.value)


def test_it_takes_real_commands_options_and_variables() -> None:
    check_place(
        "here",
        [["relay", "--create-topics"], ["db", "check"]],
        ["POSTROOM_RELAY_ID", "POSTROOM_DATABASE_URL", "POSTROOM_KAFKA_SASL_PASSWORD", "OTHER"],
        shared=["POSTROOM_BROKER_URL"],
    )


def test_metric_names_leave_out_functions_labels_ranges_and_numbers() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{job=~"x|y"}[5m]))) > 1e3 '
        "or on (instance) b offset 5m and bool c:d:e"
    )
    assert metric_names(expr) == {"a_bucket", "b", "c:d:e"}
