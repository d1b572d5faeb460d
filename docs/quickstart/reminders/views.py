from django.http import JsonResponse

from .alarms import remind


def schedule_reminder(request):
    message = remind(request.GET["email"], in_ms=int(request.GET.get("in_ms", 60_000)))
    return JsonResponse({"id": message.id, "at": message.dispatch_at.isoformat()})
