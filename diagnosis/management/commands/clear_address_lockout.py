import ipaddress

from django.core.management.base import BaseCommand, CommandError

from diagnosis.login_throttle import counted_source, forgive_address


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
            try:  # a typo, or an address copied with its port, "had no failed sign-ins" and stayed locked out
                ipaddress.ip_address(address.strip())
            except ValueError:
                raise CommandError(
                    f"{address!r} is not an IP address: give it as the access trail records it, e.g. 203.0.113.7 "
                    "or 2001:db8::7, without a port"
                ) from None
            counted_as = counted_source(address.strip())
            # An IPv6 address is counted with the rest of its /64 network: say which addresses it frees.
            shown = f"{address} (counted as {counted_as})" if "/" in counted_as else address
            if forgive_address(address):
                self.stdout.write(f"{shown}: sign-in lockout cleared")
            else:
                self.stdout.write(f"{shown}: had no failed sign-ins counted")
