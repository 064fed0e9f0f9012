"""Django's upload handlers, keeping each file's name as the user's computer has it.

Django cuts a name over 255 characters at its end, keeping only the extension, so the end that
tells a lab's numbered files apart (``…_cell_1.png``, ``…_cell_2.png``) was gone before
validation.display_name could shorten the name in the middle. And browsers send a double quote in
a file name as ``%22`` (the HTML standard's multipart encoding), which Django keeps.
"""

from django.core.files.uploadhandler import MemoryFileUploadHandler, TemporaryFileUploadHandler


class _KeepingTheWholeName:
    def file_complete(self, file_size):
        file = super().file_complete(file_size)
        if file is not None:
            file.client_name = self.file_name.replace("%22", '"')
        return file


class MemoryFileKeepingItsName(_KeepingTheWholeName, MemoryFileUploadHandler):
    pass


class TemporaryFileKeepingItsName(_KeepingTheWholeName, TemporaryFileUploadHandler):
    pass
