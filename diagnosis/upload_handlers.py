"""Django's upload handlers, keeping each file's name as the user's computer has it.

Django cuts a name over 255 characters at its end, keeping only the extension, so the end that
tells a lab's numbered files apart (``…_cell_1.png``, ``…_cell_2.png``) was gone before
validation.display_name could shorten the name in the middle. And browsers send a double quote in
a file name as ``%22`` (the HTML standard's multipart encoding), which Django keeps.
"""

import os

from django.conf import settings
from django.core.files.uploadhandler import MemoryFileUploadHandler, TemporaryFileUploadHandler


def spool_folder() -> str:
    """FILE_UPLOAD_TEMP_DIR, made again if it has gone: settings make it only at start, and media
    restored or cleaned by hand while the site runs took it away, failing every large upload with a
    500 until a restart."""
    os.makedirs(settings.FILE_UPLOAD_TEMP_DIR, exist_ok=True)
    return settings.FILE_UPLOAD_TEMP_DIR


class _KeepingTheWholeName:
    def file_complete(self, file_size):
        file = super().file_complete(file_size)
        if file is not None:
            file.client_name = self.file_name.replace("%22", '"')
        return file


class MemoryFileKeepingItsName(_KeepingTheWholeName, MemoryFileUploadHandler):
    pass


class TemporaryFileKeepingItsName(_KeepingTheWholeName, TemporaryFileUploadHandler):
    def new_file(self, *args, **kwargs):
        spool_folder()
        super().new_file(*args, **kwargs)
