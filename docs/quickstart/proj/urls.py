from django.contrib import admin
from django.urls import path
from reminders.views import schedule_reminder

urlpatterns = [
    path("admin/", admin.site.urls),
    path("remind/", schedule_reminder),
]
