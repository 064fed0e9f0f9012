from django.urls import path, re_path

from diagnosis import exports, review, views

app_name = "diagnosis"

urlpatterns = [
    path("", views.dashboard, name="dashboard"),
    path("export.csv", exports.dashboard_csv, name="export-csv"),
    path("upload/", views.upload, name="upload"),
    path("status.json", views.analyses_status, name="analyses-status"),
    path("batches/", views.batch_list, name="batch-list"),
    path("batches/<int:pk>/", views.batch_detail, name="batch"),
    path("batches/<int:pk>/status.json", views.batch_status, name="batch-status"),
    path("batches/<int:pk>/export.csv", exports.batch_csv, name="batch-csv"),
    path("batches/<int:pk>/report/", exports.batch_report, name="batch-report"),
    path("batches/<int:pk>/delete/", views.batch_delete, name="batch-delete"),
    path("batches/<int:pk>/retry/", views.batch_retry, name="batch-retry"),
    path("analyses/<int:pk>/", views.analysis_detail, name="analysis"),
    path("analyses/<int:pk>/delete/", views.analysis_delete, name="analysis-delete"),
    path("analyses/<int:pk>/retry/", views.analysis_retry, name="analysis-retry"),
    # image: the stored original; picture: the original as a browser can draw it (a TIFF as PNG).
    re_path(
        r"^analyses/(?P<pk>[0-9]+)/(?P<kind>image|picture|overlay|thumbnail)/$",
        views.analysis_file,
        name="analysis-file",
    ),
    path("account/api-token/", views.api_token, name="api-token"),
    path("review/", review.queue, name="review-queue"),
    path("review/<int:pk>/", review.review, name="review"),
]
