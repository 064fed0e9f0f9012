from django.contrib import admin
from django.urls import include, path

from diagnosis.login_throttle import ThrottledLoginView
from diagnosis.views import healthz

urlpatterns = [
    path("", include("diagnosis.urls")),
    path("api/", include("diagnosis.api.urls")),
    path("accounts/login/", ThrottledLoginView.as_view(), name="login"),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
]
