"""Every Redis name comes from `Keys`: DESIGN §2 names, configurable prefix, and hash tags
that keep what one script or one request touches in one Redis Cluster slot."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from tokenfleet.producer.admission import ADMIT_LUA
from tokenfleet.producer.keys import CONSUMER_GROUP, LANES, Keys, lane_for_priority


def test_names_follow_the_design():
    k = Keys()
    assert k.jobs("smollm2") == "tf:{smollm2}:jobs"
    assert k.dead("smollm2") == "tf:{smollm2}:dead"
    assert k.events("abc") == "tf:{r:abc}:events"
    assert k.result("abc") == "tf:{r:abc}:result"
    assert k.cancel("abc") == "tf:{r:abc}:cancel"
    assert k.tokens("abc") == "tf:{r:abc}:tokens"
    assert k.control() == "tf:control"
    assert k.worker("w1") == "tf:workers:w1"
    assert k.workers_pattern() == "tf:workers:*"
    assert k.group("smollm2") == CONSUMER_GROUP


def test_prefix_is_configurable_and_isolates_fleets():
    a, b = Keys("fleet-a"), Keys("fleet-b")
    assert a.jobs("q") == "fleet-a:{q}:jobs"
    names = {a.jobs("q"), a.events("r"), a.control(), a.worker("w"), a.limits("q")}
    assert names.isdisjoint({b.jobs("q"), b.events("r"), b.control(), b.worker("w"),
                             b.limits("q")})


def test_admission_keys_share_one_cluster_slot():
    k = Keys()
    slots = {key_slot(name.encode()) for name in
             (k.jobs("q1"), k.dead("q1"), k.limits("q1"), k.submitted("q1", "some-request"))}
    assert len(slots) == 1
    assert key_slot(k.jobs("q1").encode()) != key_slot(k.jobs("q2").encode())


def test_request_keys_share_one_cluster_slot():
    k = Keys()
    for rid in ("a", "0f3c9b2e", "tenant/42:req-7"):
        slots = {key_slot(n.encode()) for n in (k.events(rid), k.result(rid), k.cancel(rid),
                                                k.tokens(rid), k.seed(rid))}
        assert len(slots) == 1
    assert k.seed("abc") == "tf:{r:abc}:seed"


@pytest.mark.parametrize("bad", ["", "a b", "x{y", "x}y", "q*", "new\nline"])
def test_names_that_would_break_hash_tags_or_patterns_are_refused(bad):
    with pytest.raises(ValueError):
        Keys().jobs(bad)
    with pytest.raises(ValueError):
        Keys().events(bad)
    with pytest.raises(ValueError):
        Keys(prefix=bad)


def test_admission_script_touches_only_its_declared_keys():
    # Redis Cluster requires scripts to name every key they touch in KEYS: the job's lane,
    # the limits, the idempotency key, then (KEYS[4..]) every lane, for the backlog.
    assert "KEYS[1]" in ADMIT_LUA and "KEYS[3]" in ADMIT_LUA
    assert "for i = 4, #KEYS do" in ADMIT_LUA
    assert "KEYS[4]" not in ADMIT_LUA


def test_a_queues_lanes_share_its_cluster_slot():
    """One XREADGROUP blocks on every lane and one script admits across them: in Redis
    Cluster that needs one hash slot, i.e. the same hash tag."""
    keys = Keys()
    tags = {keys.jobs("q", lane).split("{")[1].split("}")[0] for lane in LANES}
    assert tags == {"q"}
    assert keys.jobs("q") == keys.jobs("q", "normal") == "tf:{q}:jobs"  # the original name
    assert [lane_for_priority(p) for p in (5, 1, 0, -1, -9)] == \
        ["high", "high", "normal", "low", "low"]
    with pytest.raises(ValueError):
        keys.jobs("q", "urgent")


def test_the_keda_trigger_watches_the_default_queue_of_the_default_prefix():
    yaml = pytest.importorskip("yaml")
    from pathlib import Path

    manifest = Path(__file__).resolve().parents[2] / "deploy" / "k8s" / "keda-scaledobject.yaml"
    triggers = yaml.safe_load(manifest.read_text())["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["redis-streams"] * len(LANES)
    assert [t["metadata"]["stream"] for t in triggers] == \
        [Keys().jobs("default", lane) for lane in LANES]
    assert {t["metadata"]["consumerGroup"] for t in triggers} == {CONSUMER_GROUP}
    # Scaled on the sum of the lanes' lags (the HPA alone would take the largest lane).
    modifiers = yaml.safe_load(manifest.read_text())["spec"]["advanced"]["scalingModifiers"]
    assert [t["name"] for t in triggers] == list(LANES)
    assert modifiers["formula"] == " + ".join(LANES)
