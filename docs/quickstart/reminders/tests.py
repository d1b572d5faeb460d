import datetime as dt

from reminders.alarms import remind


def test_a_reminder_is_scheduled_for_its_time(alarm_kit):
    remind("ada@example.com", in_ms=60_000)
    [alarm] = alarm_kit.assert_dispatched("reminders.tasks.send_reminder", aggregate_id="ada@example.com")
    assert alarm.due == alarm_kit.now + dt.timedelta(minutes=1)


def test_a_reminder_is_sent_when_due_and_not_before(alarm_kit):
    remind("ada@example.com", in_ms=60_000)
    assert alarm_kit.run_due() == []
    alarm_kit.advance(minutes=1)
    [delivery] = alarm_kit.run_due()
    assert delivery.action == "finished" and delivery.response.value == "ada@example.com"


def test_a_bad_address_is_tried_four_times_then_fails(alarm_kit):
    remind("nobody", in_ms=0)
    deliveries = alarm_kit.drain()  # 1 s, 2 s and 4 s of back-off, simulated
    assert [d.action for d in deliveries] == ["retried", "retried", "retried", "failed"]
    assert deliveries[-1].reason == "gave up after 4 attempts"
