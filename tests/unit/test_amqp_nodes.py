"""``--amqp-url`` with several nodes of one cluster, and the jobs queue's type (issue 15 §2)."""

from __future__ import annotations

import pytest

from common.config import HeadSettings
from common.errors import ConfigError
from head_node.jobqueue import AmqpQueue, node_urls
from head_node.store import JobStore


def test_several_nodes_are_taken_in_order_without_blanks() -> None:
    assert node_urls("amqp://a:5672/, amqp://b:5673/,,amqps://c/") == ["amqp://a:5672/", "amqp://b:5673/",
                                                                        "amqps://c/"]
    assert node_urls("") == []


@pytest.mark.parametrize("url", ["http://rabbit:5672/", "amqp://a/,rabbit:5672", "a"])
def test_a_url_that_is_not_amqp_is_refused_at_start(url: str) -> None:
    with pytest.raises(ConfigError, match="amqp"):
        HeadSettings.parse(["--amqp-url", url], env={})


def test_the_queue_type_is_checked_and_a_quorum_queue_says_so_when_declared(tmp_path) -> None:
    with pytest.raises(SystemExit):  # argparse refuses a choice it does not know
        HeadSettings.parse(["--amqp-queue-type", "stream"], env={})
    cfg = HeadSettings.parse(["--amqp-url", "amqp://a/,amqp://b/", "--amqp-queue-type", "quorum"], env={})
    queue = AmqpQueue(cfg.amqp_url, JobStore(tmp_path / "jobs.sqlite3"), b"k" * 32, queue_type=cfg.amqp_queue_type)
    assert queue.url == "amqp://a/" and queue.queue_arguments() == {"x-queue-type": "quorum"}
    classic = AmqpQueue("amqp://a/", JobStore(tmp_path / "other.sqlite3"), b"k" * 32)
    assert classic.queue_arguments() is None
