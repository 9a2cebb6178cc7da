from remoteops import Check, hookimpl


class UptimeCheck(Check):
    name = "uptime"
    probe = '''
def probe(ctx):
    with open("/proc/uptime") as fh:
        return float(fh.read().split()[0])
'''

    def evaluate(self, value, settings):
        return self.ok(f"up {value / 3600:.1f} h")


@hookimpl
def register_checks(register):
    register(UptimeCheck())
