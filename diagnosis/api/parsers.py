"""The uploads' multipart parser."""

from django.http.multipartparser import MultiPartParser as DjangoMultiPartParser
from django.http.multipartparser import MultiPartParserError
from rest_framework.exceptions import ParseError
from rest_framework.parsers import DataAndFiles, MultiPartParser, get_encoding


class _RefusingNamelessFiles(DjangoMultiPartParser):
    def sanitize_file_name(self, file_name):
        if cleaned := super().sanitize_file_name(file_name):
            return cleaned
        # Django drops such a part unseen: a batch would be stored without that image, and say nothing.
        raise MultiPartParserError(
            f"A file part's name, {file_name!r}, has no file name in it: name each file (e.g. cell-01.png)."
        )


class UploadParser(MultiPartParser):
    """DRF's multipart parser, but a file part whose name is no file name once its folders are
    cleaned off (``.``, ``..``, ``scans/``) is refused rather than dropped."""

    def parse(self, stream, media_type=None, parser_context=None):
        request = parser_context["request"]
        meta = request.META.copy()
        meta["CONTENT_TYPE"] = media_type
        try:  # the constructor refuses a missing boundary or a bad length
            parser = _RefusingNamelessFiles(meta, stream, request.upload_handlers, get_encoding(parser_context))
            return DataAndFiles(*parser.parse())
        except MultiPartParserError as error:
            raise ParseError(f"Multipart form parse error - {error}") from error
