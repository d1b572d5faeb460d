from django.contrib import admin

from .models import Event, Order

admin.site.register(Order)
admin.site.register(Event)
