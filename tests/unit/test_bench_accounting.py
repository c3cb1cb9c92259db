"""The benchmark's accounting (bench/chatbench/accounting.py) on synthetic steps: expected, lost, duplicated,
late-free order, percentiles, exactly as ../shared/bench/fanout.mjs defines them."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chatbench.accounting import ClientLog, Message, analyse, inversions, latency_stats, percentile
from chatbench.scenarios import pick_senders

MS = 1_000_000


def room_step(
    n_clients: int = 3, n_messages: int = 4, *, room: int = 0, first_client: int = 0, first_key: int = 0
) -> tuple[list[Message], list[ClientLog]]:
    """n_messages measured messages in one room, sent by its first client at 10 ms apart, and n_clients who all
    received all of them in order, each 5 ms after it was sent."""
    messages = [
        Message(key=first_key + k, room=room, sender=first_client, sent_ns=k * 10 * MS, measured=True)
        for k in range(n_messages)
    ]
    clients = [
        ClientLog(
            index=first_client + c,
            room=room,
            keys=[m.key for m in messages],
            latencies_ns=[5 * MS] * n_messages,
        )
        for c in range(n_clients)
    ]
    return messages, clients


def test_percentile_is_nearest_rank_like_fanout() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50
    assert percentile(values, 0.9) == 90
    assert percentile(values, 0.99) == 99
    assert percentile([10.0, 20.0, 30.0], 0.5) == 20
    assert percentile([10.0, 20.0, 30.0], 0.99) == 30
    assert percentile([7.0], 0.01) == 7
    assert percentile([], 0.5) is None


def test_latency_stats_in_milliseconds() -> None:
    stats = latency_stats([3 * MS, 1 * MS, 2 * MS, 4 * MS])
    assert (stats.n, stats.p50, stats.p99, stats.max, stats.mean) == (4, 2.0, 4.0, 4.0, 2.5)
    assert latency_stats([]).n == 0
    assert latency_stats([]).p99 is None


def test_inversions_counts_pairs_out_of_order() -> None:
    assert inversions([0, 1, 2, 3]) == 0
    assert inversions([3, 2, 1, 0]) == 6
    assert inversions([1, 0, 3, 2]) == 2
    assert inversions([]) == 0


@given(st.lists(st.integers(min_value=0, max_value=50), max_size=40))
def test_inversions_match_counting_every_pair(values: list[int]) -> None:
    slow = sum(1 for i in range(len(values)) for j in range(i + 1, len(values)) if values[i] > values[j])
    assert inversions(values) == slow


def test_a_clean_step() -> None:
    messages, clients = room_step()
    result = analyse(messages, clients, rooms=1, duration_s=2)
    assert result.sent_msgs == 4
    assert result.accepted_msgs == 4  # the sender (client 0) got its own copies
    assert result.expected_deliveries == 12
    assert result.received_deliveries == 12
    assert (result.lost, result.duplicated, result.msgs_incomplete, result.msgs_undelivered) == (0, 0, 0, 0)
    assert result.deliveries_per_s == 6
    assert result.latency_ms.n == 12
    assert result.latency_ms.p99 == 5.0
    assert result.echo_latency_ms.n == 4
    assert result.order.same_order
    assert result.order.common_msgs == 4
    assert result.order.client_pairs == 3
    assert result.order.disagreeing_client_pairs == 0


def test_warmup_messages_are_not_counted() -> None:
    messages, clients = room_step()
    messages.append(Message(key=99, room=0, sender=0, sent_ns=-1, measured=False))
    result = analyse(messages, clients, rooms=1, duration_s=2)
    assert (result.sent_msgs, result.expected_deliveries) == (4, 12)


def test_a_missing_delivery_is_lost_but_not_disorder() -> None:
    messages, clients = room_step()
    clients[2].keys = [0, 1, 3]
    clients[2].latencies_ns = [5 * MS] * 3
    result = analyse(messages, clients, rooms=1, duration_s=2)
    assert result.received_deliveries == 11
    assert result.lost == 1
    assert result.msgs_incomplete == 1
    assert result.msgs_undelivered == 0
    # order is compared on the messages every client received: 0, 1, 3 are in the same order everywhere
    assert result.order.same_order
    assert result.order.common_msgs == 3


def test_a_duplicate_counts_once_and_is_reported() -> None:
    messages, clients = room_step()
    clients[1].keys = [0, 1, 1, 2, 3]
    clients[1].latencies_ns = [5 * MS, 5 * MS, 50 * MS, 5 * MS, 5 * MS]
    result = analyse(messages, clients, rooms=1, duration_s=2)
    assert result.duplicated == 1
    assert result.received_deliveries == 12
    assert result.lost == 0
    assert result.latency_ms.n == 13  # every delivery, duplicates included
    assert result.latency_ms.max == 50.0
    assert result.order.same_order  # the second copy is ignored for order


def test_a_swapped_pair_on_one_client_breaks_same_order() -> None:
    messages, clients = room_step(n_clients=4)
    clients[3].keys = [0, 2, 1, 3]
    result = analyse(messages, clients, rooms=1, duration_s=2)
    assert result.lost == 0
    assert not result.order.same_order
    assert result.order.max_distinct_orders_in_a_room == 2
    assert result.order.clients_off_majority == 1
    assert result.order.disagreeing_client_pairs == 3  # client 3 against each of the other three
    assert result.order.client_pairs == 6
    assert result.order.inverted_msg_pairs_max == 1
    assert result.order.inverted_msg_pairs_total == 1


def test_accepted_means_the_sender_got_its_own_copy() -> None:
    messages, clients = room_step()
    clients[0].keys = [0, 1, 2]  # the sender never saw message 3
    clients[0].latencies_ns = [7 * MS, 8 * MS, 9 * MS]
    result = analyse(messages, clients, rooms=1, duration_s=2)
    assert result.accepted_msgs == 3
    assert result.echo_latency_ms.n == 3
    assert result.echo_latency_ms.max == 9.0
    assert result.lost == 1


def test_a_message_nobody_received() -> None:
    messages, clients = room_step()
    for client in clients:
        client.keys = [0, 1, 2]
        client.latencies_ns = [MS] * 3
    result = analyse(messages, clients, rooms=1, duration_s=2)
    assert result.msgs_undelivered == 1
    assert result.msgs_incomplete == 1
    assert result.lost == 3
    assert result.accepted_msgs == 3


def test_a_client_closed_mid_step_is_not_expected_afterwards() -> None:
    messages, clients = room_step()  # messages sent at 0, 10, 20, 30 ms
    clients[2].closed_ns = 15 * MS
    clients[2].keys = [0, 1]
    clients[2].latencies_ns = [MS, MS]
    result = analyse(messages, clients, rooms=1, duration_s=2)
    assert result.expected_deliveries == 3 + 3 + 2 + 2
    assert result.received_deliveries == 10
    assert result.lost == 0


def test_deliveries_of_unknown_messages_are_counted_apart() -> None:
    messages, clients = room_step()
    clients[1].keys = [*clients[1].keys, 12345]
    clients[1].latencies_ns = [*clients[1].latencies_ns, 999 * MS]
    result = analyse(messages, clients, rooms=1, duration_s=2)
    assert result.unknown_deliveries == 1
    assert result.received_deliveries == 12
    assert result.latency_ms.max == 5.0


def test_rooms_are_compared_separately() -> None:
    a_messages, a_clients = room_step(n_clients=3, room=0, first_client=0, first_key=0)
    b_messages, b_clients = room_step(n_clients=3, room=1, first_client=10, first_key=100)
    b_clients[2].keys = [100, 102, 101, 103]
    lone = ClientLog(index=20, room=2, keys=[], latencies_ns=[])  # a room of one has no order to compare
    result = analyse(a_messages + b_messages, [*a_clients, *b_clients, lone], rooms=3, duration_s=2)
    assert result.expected_deliveries == 24
    assert result.received_deliveries == 24
    assert result.order.clients_compared == 6
    assert result.order.client_pairs == 6
    assert result.order.disagreeing_client_pairs == 2
    assert result.order.max_distinct_orders_in_a_room == 2
    assert not result.order.same_order


def test_senders_are_spread_over_rooms_like_fanout() -> None:
    open_clients = [(c, c % 3) for c in range(9)]  # rooms 0: 0,3,6  1: 1,4,7  2: 2,5,8
    assert pick_senders(3, 3, open_clients) == [0, 1, 2]
    assert pick_senders(6, 3, open_clients) == [0, 1, 2, 3, 4, 5]
    # more slots than members: a member holds several slots
    assert pick_senders(4, 1, [(0, 0), (1, 0)]) == [0, 1, 0, 1]
    # a room with nobody open gets no sender
    assert pick_senders(2, 2, [(0, 0)]) == [0]
