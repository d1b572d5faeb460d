from celery import shared_task


@shared_task
def send_reminder(email):
    if "@" not in email:
        raise ValueError(f"not an email address: {email!r}")
    print(f"reminder sent to {email}")
    return email
