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


class _PartCountingStream:
    """The body as Django reads it, counting the delimiters between parts on the way: Django passes
    over a part it cannot name (no Content-Disposition or name, or a header line that is not UTF-8,
    as a Windows client's file name in its code page) without a word."""

    def __init__(self, stream, boundary: bytes):
        self.stream = stream
        self.delimiter = b"\r\n--" + boundary
        # Counted as if after a line break, so the body's first delimiter (which has none) counts too.
        self.tail = b"\r\n"
        self.delimiters = 0
        # Django finishes a file part only at the delimiter after it: a body cut short, or sent
        # without its closing delimiter, would be stored without its last part.
        self.closed = False

    def read(self, *args) -> bytes:
        chunk = self.stream.read(*args)
        seen = self.tail + chunk  # a delimiter may straddle two reads
        self.delimiters += seen.count(self.delimiter) - self.tail.count(self.delimiter)
        self.closed = self.closed or self.delimiter + b"--" in seen
        self.tail = seen[-(len(self.delimiter) + 1) :]
        return chunk

    @property
    def parts(self) -> int:
        return max(0, self.delimiters - 1)  # the last delimiter closes the body, opening no part


class UploadParser(MultiPartParser):
    """DRF's multipart parser, but a part that Django would drop unseen is refused: a file part whose
    name is no file name once its folders are cleaned off (``.``, ``..``, ``scans/``), a part it
    cannot read, and a field that is not UTF-8 text (stored, it would be garbled)."""

    def parse(self, stream, media_type=None, parser_context=None):
        request = parser_context["request"]
        meta = request.META.copy()
        meta["CONTENT_TYPE"] = media_type
        try:  # the constructor refuses a missing boundary or a bad length
            parser = _RefusingNamelessFiles(meta, stream, request.upload_handlers, get_encoding(parser_context))
            # Django's parser reads the body through this attribute, and its boundary from that one.
            counter = parser._input_data = _PartCountingStream(stream, parser._boundary)
            data, files = parser.parse()
        except MultiPartParserError as error:
            raise ParseError(f"Multipart form parse error - {error}") from error
        if counter.delimiters and not counter.closed:
            raise ParseError(
                "The body ends before the form's closing boundary (cut short, or not closed with "
                "--boundary--): nothing was stored. Send it again, whole."
            )
        if counter.parts > sum(len(values) for _, values in [*data.lists(), *files.lists()]):
            raise ParseError(
                "A part of the form could not be read (it has no name, or its headers are not UTF-8): "
                "name every part, and send file names as UTF-8. Nothing was stored."
            )
        if garbled := sorted(name for name, values in data.lists() if any("\ufffd" in value for value in values)):
            raise ParseError(
                f"The field {', '.join(garbled)} is not UTF-8 text: send the form's fields as UTF-8. "
                "Nothing was stored."
            )
        return DataAndFiles(data, files)
