from celery_scheduller import OK, Fail, Message, Retry, Scheduller


class ReminderAlarms(Scheduller):
    name = "reminders"

    def service_responded(self, message):
        if message.response.ok:
            return OK  # delivered: off the schedule
        tries = message.assigns.get("tries", 0)
        if tries < 3:  # an error or a timeout: try again in 1 s, 2 s, 4 s
            return Retry(1_000 * 2**tries, message.assign("tries", tries + 1))
        return Fail(f"gave up after {tries + 1} attempts")  # failed, with its history, in the admin


def remind(email, in_ms):
    message = Message.new("reminders.tasks.send_reminder", {"email": email})
    return ReminderAlarms().dispatch(message, aggregate_id=email, in_ms=in_ms)
