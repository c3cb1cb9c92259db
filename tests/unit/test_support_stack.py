"""The test stack's view of a Redis Cluster (support/stack.py), without Docker: the slot of a room, CLUSTER NODES
parsed, and what keeps a cluster from being whole."""

from __future__ import annotations

from dataclasses import replace

from support.stack import ClusterNode, cluster_problem, parse_cluster_nodes, room_on, room_slot

# CLUSTER NODES of a cluster made by redis-cli --cluster create, after redis-node-2 failed and redis-node-6 took over
# its slots; redis-node-5's address was lost (noaddr), as happens when two nodes swap addresses. Node ids shortened
# from Redis's 40 characters.
NODES = "\n".join(
    [
        "e5fb8f4e 172.21.0.5:6379@16379,redis-node-1 myself,master - 0 1796184520000 1 connected 0-5460",
        "f9e90cfd 172.21.0.4:6379@16379,redis-node-2 master,fail - 1796184643768 1796184641250 2 connected",
        "2a99d192 172.21.0.6:6379@16379,redis-node-3 master - 0 17961845214 3 connected 10923-16383 [10924->-f9e90cfd]",
        "82f8fc4a 172.21.0.3:6379@16379,redis-node-4 slave 2a99d192 0 1796184520467 3 connected",
        "a909ad88 :0@0,redis-node-5 slave,noaddr e5fb8f4e 1796184629268 1796184629268 1 disconnected",
        "3ab937f5 172.21.0.2:6379@16379,redis-node-6 master - 0 1796184520000 7 connected 5461-10921 10922",
    ]
)


def nodes() -> list[ClusterNode]:
    return parse_cluster_nodes(NODES, lambda host: f"chat-{host}-1")


def test_a_room_s_slot_is_the_crc16_of_its_hash_tag() -> None:
    # Slots Redis 7.0's CLUSTER KEYSLOT gave for these keys (the system tests compare more on the live cluster).
    assert room_slot("r0") == 6248
    assert room_slot("r1") == 2121
    assert room_slot("r2") == 14378
    assert room_slot("lobby") == room_slot("lobby")


def test_cluster_nodes_are_parsed_with_roles_slots_and_what_each_replica_follows() -> None:
    by_host = {node.host: node for node in nodes()}
    assert sorted(by_host) == [f"redis-node-{n}" for n in range(1, 7)]
    first = by_host["redis-node-1"]
    assert (first.primary, first.follows, first.slots, first.container) == (
        True,
        None,
        ((0, 5460),),
        "chat-redis-node-1-1",
    )
    assert by_host["redis-node-3"].slots == ((10923, 16383),)  # a slot being migrated is not counted twice
    assert by_host["redis-node-6"].slots == ((5461, 10921), (10922, 10922))
    assert by_host["redis-node-4"].follows == by_host["redis-node-3"].id
    assert not by_host["redis-node-4"].primary
    assert by_host["redis-node-2"].failing
    assert by_host["redis-node-5"].failing
    assert not by_host["redis-node-1"].failing
    assert by_host["redis-node-6"].serves(10922)
    assert not by_host["redis-node-6"].serves(10923)


def test_a_cluster_is_whole_with_three_primaries_over_every_slot_each_with_one_replica() -> None:
    seen = nodes()
    assert cluster_problem(seen) is not None  # two nodes failing
    healed = [replace(node, flags=frozenset(), connected=True) for node in seen]
    # redis-node-2 came back as the replica of redis-node-6, which took its slots over.
    heir = next(node for node in healed if node.host == "redis-node-6")
    healed = [replace(n, primary=False, follows=heir.id) if n.host == "redis-node-2" else n for n in healed]
    assert cluster_problem(healed) is None
    first = healed[0]
    lopsided = [replace(n, follows=first.id) if n.host == "redis-node-4" else n for n in healed]
    assert str(cluster_problem(lopsided)).startswith("replicas per primary")
    short = [replace(n, slots=n.slots[:1]) if n.host == "redis-node-6" else n for n in healed]
    assert cluster_problem(short) == "3 primaries serve 16383 slots"


def test_room_on_gives_a_room_whose_slot_the_node_serves() -> None:
    node = next(node for node in nodes() if node.host == "redis-node-3")
    for _ in range(5):
        room = room_on(node)
        assert 10923 <= room_slot(room) <= 16383
