from django.core.management.base import BaseCommand

from diagnosis.login_throttle import forgive_address


class Command(BaseCommand):
    help = (
        "Clear the sign-in lockout of client addresses that failed at too many names "
        "(LOGIN_MAX_FAILURES_PER_ADDRESS), e.g. a hospital's shared address. A user's own lockout "
        "is cleared in the admin's Users list."
    )

    def add_arguments(self, parser):
        parser.add_argument("addresses", nargs="+", metavar="ADDRESS", help="as the access trail records it")

    def handle(self, *args, addresses, **options):
        for address in addresses:
            if forgive_address(address):
                self.stdout.write(f"{address}: sign-in lockout cleared")
            else:
                self.stdout.write(f"{address}: had no failed sign-ins counted")
