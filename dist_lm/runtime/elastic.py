"""`dist-lm launch --host-discovery-script ...`: an elastic job, which restarts its world
when hosts are lost or come back, and continues from the newest checkpoint each time.

The torchrun model, not Horovod's in-process reset (which Horovod 0.28.1 has no MXNet
state for): each world is one launch of mpirun or horovodrun, supervised as launch.py
supervises any launch, with `-np N -H host:slots,...` chosen here from the discovery
script's hosts (discovery.py). The training command resumes with `--resume auto` and
trains a global batch (`--global-batch-size G`: G columns over any N <= G ranks), whose
dropout masks belong to its columns, so a world of any size takes the steps that one
process would, and an elastic run ends with the numbers of an uninterrupted one, up to
float noise (docs/reliability.md, "When the numbers do not depend on N"). The training
command is read as its ranks will read it (`training_config`), and one whose numbers
depend on the rank count (`Config.world_size_dependence`: --clip-mode local, ...) is
refused unless --allow-world-size-dependence accepts it.

- A world ends with a lost rank or host: the hosts its report names as lost (jobreport:
  unreachable, killed, a pod stopped by its preStop hook) sit out their cooldown, and the
  next world starts at once on the hosts that remain, if they give at least --min-np
  slots; else it waits for hosts, up to --elastic-timeout, then ends with one line.
  The steps since the last checkpoint are lost (the default cadence of an elastic run is
  --checkpoint-minutes 5).
- New hosts listed (and answering ssh) while a world trains, with room under --max-np:
  once the world has run --grow-interval seconds, it is asked to stop with a checkpoint
  (the agreed stop of a SIGTERM) and the next world starts with them: nothing is lost.
- A stop signal to this supervisor stops the world with a checkpoint and ends the job: no
  restart, also when it comes between two worlds (the next one is not started). An error
  that another start would meet again (bad input, non-finite values) ends it too, and so
  does the --reset-limit-th restart after a failure. Storage that failed in a way that
  passes (exit 7) is such a failure, after a back-off.
- A world refused because its run directory is still locked (exit 5: a rank of the last
  world, on a lost node, has not ended yet) is started again, after 1, 2, 4 ... 30 s,
  until --busy-timeout (by default the training command's longest wait, so that the
  holder's own watchdog ends it first); this does not count against --reset-limit.
Every restart prints one line (why; hosts and ranks before and after; the step it
continues from; the steps lost), and the ranks get the same facts (DIST_LM_WORLD), which
rank 0 writes to metrics.jsonl and TensorBoard (`world/ranks`, `world/restarts`).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from typing import Dict, List, Optional, Tuple

from ..config import Config, LaunchConfig, ReliabilityConfig, add_config_args, config_from_args
from ..errors import UsageError
from . import discovery, selfreport
from .discovery import Cooldowns, DiscoveryFailed, Hosts
from .jobreport import here, probe_hosts
from .launch import (HOST_FLAGS, HOSTFILE_FLAGS, Ending, Signals, last_word, launcher_kind,
                     option, run_launcher, ssh_command)

NP_FLAGS = ("-np", "-n", "--np", "-c")
WORLD = selfreport.WORLD   # what each world's ranks are told of it
# Between the holder's own limit and its lock's lapse: its watchdog's check (1 s), its
# stop grace (30 s), an NFS server's lease on a lost client's lock (90 s by default).
BUSY_MARGIN_S = 120.0
BUSY_WAITS_S = (1.0, 30.0)   # first, most: the wait before each start while it is locked


def say(line: str) -> None:
    last_word(f"dist-lm: elastic: {line}")


def check_command(argv: List[str], cfg: LaunchConfig) -> Tuple[List[str], int]:
    """The launcher's command as each world runs it, less -np and -H, and the global
    batch G; UsageError for a command an elastic job cannot run."""
    kind = launcher_kind(argv)
    if kind == "other":
        raise UsageError(f"elastic mode runs mpirun or horovodrun, not {argv[0]}")
    for flags in (NP_FLAGS, HOST_FLAGS, HOSTFILE_FLAGS):
        if option(argv, flags) is not None:
            raise UsageError(f"elastic mode chooses the ranks and hosts itself: leave "
                             f"{flags[0]} out of the launcher's arguments")
    train = training_config(argv)
    if train.reliability.resume != "auto":
        raise UsageError("elastic mode needs the training command's --resume auto (each "
                         "world continues from the newest checkpoint)")
    g = train.run.global_batch_size
    if g is None:
        # Refused even with --allow-world-size-dependence: G would change with every
        # world's N, and a checkpoint resumes only with the global batch it was trained
        # with, so the first restart at another size would fail.
        raise UsageError("elastic mode needs the training command's --global-batch-size G "
                         "(the same global batch at any rank count; a checkpoint resumes "
                         "only with the global batch it was trained with)")
    reasons = train.world_size_dependence()
    if reasons and not cfg.allow_world_size_dependence:
        raise UsageError(f"the training command's {'; '.join(reasons)} make"
                         f"{'s' if len(reasons) == 1 else ''} its numbers depend on the "
                         f"rank count, which elastic mode changes between worlds; pass "
                         f"--allow-world-size-dependence to run it anyway")
    if option(argv, ("--checkpoint-minutes", "--checkpoint-steps")) is None:
        argv = [*argv, "--checkpoint-minutes", f"{cfg.checkpoint_minutes:g}"]
    return argv, g


def training_config(argv: List[str]) -> Config:
    """The Config the ranks' `dist-lm train` will train with: everything after the first
    `train` of the launcher's command, read as the ranks read it (flags, a --config file,
    which must be readable here too, the model's preset and recipe). Options that are not
    the configuration's (`--dist`) are left to the ranks."""
    if "train" not in argv:
        raise UsageError("elastic mode runs `dist-lm train` under the launcher: no `train` "
                         "in its command")
    parser = argparse.ArgumentParser(prog="dist-lm train", add_help=False)
    add_config_args(parser)

    def one_line(message: str) -> None:
        raise UsageError(f"the training command: {message}")

    parser.error = one_line
    args, _ = parser.parse_known_args(argv[argv.index("train") + 1:])
    return config_from_args(args)


def busy_timeout(argv: List[str], cfg: LaunchConfig) -> float:
    """How long, in all, to start worlds again while the run directory is locked: the
    --busy-timeout given, else the longest that a rank of an earlier world can hold it by
    the training command's own limits (a checkpoint write ends within
    --checkpoint-timeout-s, anything else within --watchdog-s; 0, no limit, counts as the
    default) plus BUSY_MARGIN_S. A holder stuck in its start-up (after it took the lock,
    before its watchdog runs: reading data, resuming) has no limit of its own: this is
    its bound, after which the job ends with a line that names it (host, pid)."""
    if cfg.busy_timeout is not None:
        return cfg.busy_timeout
    defaults = ReliabilityConfig()
    limits = []
    for flag, default in (("--watchdog-s", defaults.watchdog_s),
                          ("--checkpoint-timeout-s", defaults.checkpoint_timeout_s)):
        try:
            value = float(option(argv, (flag,)) or default)
        except ValueError:  # the ranks refuse it with one line
            value = default
        limits.append(value if value > 0 else default)
    return max(limits) + BUSY_MARGIN_S


def world_argv(argv: List[str], hosts: Hosts) -> List[str]:
    """The launcher's command for one world: -np and -H (both launchers take them) right
    after the launcher's name, and under mpirun -x for the world's facts."""
    extra = ["-np", str(discovery.slots(hosts)), "-H", discovery.render(hosts)]
    if launcher_kind(argv) == "mpirun":
        extra += ["-x", WORLD]
    return [argv[0], *extra, *argv[1:]]


class Elastic:
    """One elastic job: its worlds, one after another (see the module docstring)."""

    def __init__(self, argv: List[str], cfg: LaunchConfig, signals: Signals):
        self.argv, g = check_command(argv, cfg)
        self.cfg, self.signals = cfg, signals
        self.max_np = cfg.max_np or g
        self.min_np = cfg.min_np
        if self.max_np > g:
            raise UsageError(f"--max-np {self.max_np} is above --global-batch-size {g}: "
                             f"each rank needs at least one column")
        if self.min_np > self.max_np:
            raise UsageError(f"--min-np {self.min_np} is above --max-np {self.max_np}")
        why = discovery.executable(cfg.host_discovery_script)
        if why:
            raise UsageError(why)
        self.ssh = ssh_command(argv, launcher_kind(argv))
        self.cooldowns = Cooldowns(*cfg.blacklist_cooldown_range)
        self.failures = 0          # restarts after a failure, for --reset-limit
        self.restarts = 0          # all restarts
        self.discovery_error: Optional[str] = None
        self.silent: Dict[str, str] = {}   # listed hosts that did not answer ssh, why
        self.unexplained = 0       # failures in a row that no host was blamed for
        self.world_seconds = 0.0   # how long the last world ran
        self.busy_limit = busy_timeout(self.argv, cfg)
        self.busy_since: Optional[float] = None   # the first refusal (exit 5) in a row
        self.busy_tries = 0

    # --- hosts ---

    def available(self) -> Hosts:
        """The hosts the script lists now, less those cooling down; [] when it fails
        (said once per kind of failure)."""
        try:
            hosts = discovery.discover(self.cfg.host_discovery_script,
                                       self.cfg.slots_per_host)
        except DiscoveryFailed as err:
            if str(err) != self.discovery_error:
                say(f"warning: host discovery failed: {err}")
            self.discovery_error = str(err)
            return []
        self.discovery_error = None
        return self.cooldowns.usable(hosts)

    def answering(self, hosts: Hosts) -> Hosts:
        """Those of hosts that answer ssh now. A host the script lists may not answer yet
        (a pod listed once it runs, before its sshd listens) or may be cut off: it is
        left out this time and asked again at the next look, with no cooldown (that is
        for hosts that failed in a world)."""
        remote = {h: [] for h, _ in hosts if not here(h)}
        found = probe_hosts(remote, self.ssh) if remote else {}
        kept = []
        for host, n in hosts:
            reason = found.get(host, (None, []))[0]
            if reason is None:
                kept.append((host, n))
            elif reason != self.silent.get(host):
                say(f"{host} is listed but does not answer ssh ({reason}); left out")
            if reason is not None:
                self.silent[host] = reason
            else:
                self.silent.pop(host, None)
        return kept

    def next_hosts(self, keep: List[str]) -> Optional[Hosts]:
        """The next world's hosts, at least --min-np slots and at most --max-np, waiting
        for them up to --elastic-timeout; None when the wait ran out or a stop signal
        came meanwhile."""
        deadline = time.monotonic() + self.cfg.elastic_timeout
        said = False
        while not self.signals.received:
            hosts = discovery.choose(self.answering(self.available()), self.max_np, keep)
            if discovery.slots(hosts) >= self.min_np:
                return hosts
            if time.monotonic() > deadline:
                return None
            if not said:
                say(f"waiting for hosts: {discovery.slots(hosts)} slot(s) usable "
                    f"({discovery.render(hosts) or 'none'}), --min-np {self.min_np}; "
                    f"up to {self.cfg.elastic_timeout:g}s")
                said = True
            time.sleep(min(self.cfg.discovery_interval,
                           max(0.1, deadline - time.monotonic())))
        return None

    def watch_for_growth(self, hosts: Hosts, started: float, done: threading.Event,
                         grown: List[Hosts]) -> None:
        """While a world trains: when more slots than it has are usable (new hosts that
        answer ssh, or more slots on its own), and it has run --grow-interval, asks it to
        stop with a checkpoint; grown gets the next world's hosts."""
        names = [h for h, _ in hosts]
        while not done.wait(self.cfg.discovery_interval):
            if discovery.slots(hosts) >= self.max_np or self.signals.received:
                continue
            if time.monotonic() - started < self.cfg.grow_interval:
                continue
            bigger = discovery.choose(self.available(), self.max_np, names)
            if discovery.slots(bigger) <= discovery.slots(hosts):
                continue
            new = self.answering([(h, n) for h, n in bigger if h not in names])
            bigger = [(h, n) for h, n in bigger if h in names or (h, n) in new]
            if discovery.slots(bigger) > discovery.slots(hosts) and not done.is_set():
                grown.append(bigger)
                self.signals.ask_stop()
                return

    # --- the worlds ---

    def run(self) -> int:
        hosts = self.next_hosts([])
        if hosts is None:
            return self.no_hosts(None)
        say(f"starting {discovery.slots(hosts)} rank(s) on {discovery.render(hosts)} "
            f"(--min-np {self.min_np}, --max-np {self.max_np})")
        reason = "start"
        while True:
            ending, grown = self.one_world(hosts, reason)
            if ending.code == 0:
                return 0
            if self.signals.received:
                last_word(ending.line())
                return ending.code
            if ending.report.run_dir_busy():  # the same start again, once it is free
                if not self.wait_busy(ending):
                    return ending.code if not self.signals.received else \
                        self.no_hosts(ending)
                hosts = self.next_hosts([h for h, _ in hosts])
                if hosts is None or self.signals.received:
                    return self.no_hosts(ending)
                continue
            self.busy_since = None
            reason, failed, blamed = self.why_it_ended(ending, grown)
            if reason is None:
                last_word(ending.line())
                return ending.code
            if failed:
                self.failures += 1
                if self.failures > self.cfg.reset_limit:
                    last_word(f"dist-lm: error: job failed: {self.failures - 1} restarts "
                              f"after failures (--reset-limit {self.cfg.reset_limit}), "
                              f"and again: {ending.sentence}")
                    return ending.code
            if not self.back_off(failed and not blamed, ending):
                return self.no_hosts(ending)
            grew = bool(grown) and ending.verdict == "stopped"
            before = hosts
            hosts = grown[0] if grew else self.next_hosts([h for h, _ in hosts])
            if hosts is None or self.signals.received:  # no world starts after a stop
                return self.no_hosts(ending)
            self.restarts += 1
            step, saved = ending.report.progress()
            say(f"restart {self.restarts}: {reason}; hosts {discovery.render(before)} -> "
                f"{discovery.render(hosts)}, ranks {discovery.slots(before)} -> "
                f"{discovery.slots(hosts)}; {continues(step, saved)}")

    def back_off(self, unexplained: bool, ending: Ending) -> bool:
        """Before a restart after a failure that no host is blamed for (storage that
        failed for a moment, exit 7, say): waits 2, 4, ... up to 60 s, counting such
        failures since a world last ran a minute. False when a stop signal came
        meanwhile."""
        if self.world_seconds >= 60 or not unexplained:
            self.unexplained = 0
        if not unexplained:
            return True
        self.unexplained += 1
        wait = min(60.0, 2.0 ** self.unexplained)
        say(f"the world failed with no host to blame ({ending.sentence}); starting again "
            f"in {wait:.0f}s")
        return self.pause(wait)

    def wait_busy(self, ending: Ending) -> bool:
        """Before the same world starts again on a run directory that was still locked
        (exit 5): waits 1, 2, 4 ... 30 s, for --busy-timeout in all since the first
        refusal; not a failure (--reset-limit). False when the time is up (said in one
        line) or a stop signal came."""
        now = time.monotonic()
        if self.busy_since is None:
            self.busy_since, self.busy_tries = now, 0
        left = self.busy_since + self.busy_limit - now
        if left <= 0:
            last_word(f"dist-lm: error: job failed: the run directory was still locked "
                      f"after {self.busy_limit:g}s (--busy-timeout): {ending.sentence}")
            return False
        first, most = BUSY_WAITS_S
        wait = min(most, first * 2 ** self.busy_tries, left)
        self.busy_tries += 1
        say(f"the run directory is still locked ({ending.sentence}); starting again in "
            f"{wait:.0f}s, for up to {left:.0f}s more (--busy-timeout "
            f"{self.busy_limit:g}; not counted against --reset-limit)")
        return self.pause(wait)

    def pause(self, seconds: float) -> bool:
        """Sleeps, unless a stop signal comes; False when one came."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not self.signals.received:
            time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
        return not self.signals.received

    def one_world(self, hosts: Hosts, reason: str) -> Tuple[Ending, List[Hosts]]:
        facts = {"restart": self.restarts, "reason": reason, "hosts": discovery.render(hosts)}
        started = time.monotonic()
        done, grown = threading.Event(), []
        watcher = threading.Thread(target=self.watch_for_growth, daemon=True,
                                   args=(hosts, time.monotonic(), done, grown))
        watcher.start()
        try:
            ending = run_launcher(world_argv(self.argv, hosts), self.signals, self.cfg.grace,
                                  env={WORLD: json.dumps(facts)})
        finally:
            done.set()
            # Bounded: the watcher's discovery and ssh probes are (discovery.discover,
            # probe_hosts); and a watcher that is late asks nothing of the next world.
            watcher.join(timeout=discovery.TIMEOUT_S + 20)
            self.world_seconds = time.monotonic() - started
        return ending, grown

    def why_it_ended(self, ending: Ending,
                     grown: List[Hosts]) -> Tuple[Optional[str], bool, bool]:
        """(the reason to restart, whether it was a failure, whether hosts were blamed),
        or (None, ...) when the job must end here; sets aside the hosts to blame."""
        report = ending.report
        if ending.code == 127:  # the launcher itself could not be started
            return None, True, False
        if grown and ending.verdict == "stopped":
            return "new hosts to grow onto", False, False
        if ending.verdict == "error" and report.hopeless():
            return None, True, False
        lost = report.lost_hosts() or (report.leaving_hosts() if ending.verdict == "stopped"
                                       else [])
        for host in lost:
            self.cooldowns.fail(host)
        if lost:
            what = "lost" if ending.verdict == "error" else "stopped by a signal there"
            return f"{', '.join(lost)} {what} ({ending.sentence})", \
                ending.verdict == "error", True
        return f"the job {'stopped' if ending.verdict == 'stopped' else 'failed'} " \
               f"({ending.sentence})", True, False

    def no_hosts(self, ending: Optional[Ending]) -> int:
        if self.signals.received:
            last_word("dist-lm: stopped: job stopped while it waited to start again")
            return 143
        usable = self.available()
        why = f"; the discovery script: {self.discovery_error}" if self.discovery_error else ""
        after = f" after {ending.sentence}" if ending else ""
        last_word(f"dist-lm: error: job failed{after}: fewer than --min-np {self.min_np} "
                  f"slots usable for {self.cfg.elastic_timeout:g}s (--elastic-timeout): "
                  f"{discovery.render(usable) or 'none'}{why}")
        return ending.code if ending else 1


def continues(step: Optional[int], saved: Optional[int]) -> str:
    if saved is None and step is not None:
        return f"starting again from step 0 (no checkpoint yet; {step} step(s) lost)"
    if saved is None:
        return "continuing from the newest checkpoint"
    if step is None:
        return f"continuing from the checkpoint at step {saved}"
    return f"continuing from the checkpoint at step {saved} ({max(0, step - saved)} " \
           f"step(s) lost)"


def run_elastic(argv: List[str], cfg: LaunchConfig) -> int:
    """`dist-lm launch` with --host-discovery-script."""
    with Signals() as signals:
        try:
            job = Elastic(argv, cfg, signals)
        except UsageError as err:
            print(f"dist-lm: error: {err}", file=sys.stderr)
            return 2
        return job.run()
