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
            address = one_address(address.strip())
            counted_as = counted_source(address)
            # An IPv6 address is counted with the rest of its /64 network: say which addresses it frees.
            shown = f"{address} (counted as {counted_as})" if "/" in counted_as else address
            if forgive_address(address):
                self.stdout.write(f"{shown}: sign-in lockout cleared")
            else:
                self.stdout.write(f"{shown}: had no failed sign-ins counted")


def one_address(text: str) -> str:
    """The address to clear: as the access trail records it, or an IPv6 /64 network as this command
    prints it ("counted as 2001:db8::/64"), which an address in it stands for."""
    try:
        network = ipaddress.ip_network(text, strict=False) if "/" in text else None
        if network is None:
            return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    else:
        if network.version == 6 and network.prefixlen == 64:
            return str(network.network_address)
    # A typo, or an address copied with its port, "had no failed sign-ins" and stayed locked out.
    raise CommandError(
        f"{text!r} is not an IP address: give it as the access trail records it, e.g. 203.0.113.7 "
        "or 2001:db8::7, without a port, or an IPv6 /64 network as this command names it"
    )
