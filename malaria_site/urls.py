from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path

from diagnosis.login_throttle import (
    ThrottledLoginView,
    ThrottledPasswordChangeView,
    admin_login,
    admin_password_change,
)
from diagnosis.views import SignOutView, favicon, healthz

urlpatterns = [
    path("", include("diagnosis.urls")),
    path("api/", include("diagnosis.api.urls")),
    path("accounts/login/", ThrottledLoginView.as_view(), name="login"),
    # Accounts are made by an administrator, who also resets passwords: no public reset-by-email pages.
    path("accounts/logout/", SignOutView.as_view(), name="logout"),
    path("accounts/password_change/", ThrottledPasswordChangeView.as_view(), name="password_change"),
    path(
        "accounts/password_change/done/",
        auth_views.PasswordChangeDoneView.as_view(),
        name="password_change_done",
    ),
    # Before the admin's own: its password change would check the current password without the
    # lockout, its sign-in would not remember the browser, and its sign-out would not say so.
    path("admin/login/", admin_login),
    path("admin/password_change/", admin.site.admin_view(admin_password_change)),
    path("admin/logout/", SignOutView.as_view(), name="admin-logout"),
    path("admin/", admin.site.urls),
    re_path(r"^healthz/?$", healthz, name="healthz"),  # with or without the slash a monitor was set up with
    path("favicon.ico", favicon),
]
handler400 = "diagnosis.errors.bad_request"
handler404 = "diagnosis.errors.not_found"
handler500 = "diagnosis.errors.server_error"
