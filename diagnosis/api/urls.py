from django.urls import path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView
from rest_framework.routers import DefaultRouter

from diagnosis.api.views import AnalysisViewSet, BatchViewSet, OperationsStatusView, TokenView

app_name = "api"

router = DefaultRouter(trailing_slash=True)
# No `.json`/`.api` copies of every route: the API speaks JSON only, and the copies' extra `format`
# argument broke the actions that do not take it.
router.include_format_suffixes = False
router.register("analyses", AnalysisViewSet, basename="analysis")
router.register("batches", BatchViewSet, basename="batch")

urlpatterns = [
    path("auth/token/", TokenView.as_view(), name="token"),
    path("ops/status/", OperationsStatusView.as_view(), name="ops-status"),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularRedocView.as_view(url_name="api:schema"), name="docs"),
    *router.urls,
]
