"""The daemon as Twisted services: the store, the pruning timer and the listeners."""

from __future__ import annotations

import os

from attrs import frozen
from twisted.application.internet import StreamServerEndpointService, TimerService
from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import CannotListenError
from twisted.logger import Logger

from .bodies import Bodies, BodyPool
from .bridge import make_http_client
from .config import GatewayConfig
from .gateway import Gateway
from .metrics import Metrics
from .security import ClientKeyService, SighupReloader
from .site import make_site
from .status import RegistryTabs, StatusPages
from .status.probe import TICK as PROBE_TICK
from .status.probe import BridgeProber
from .store import open_store, secret_source
from .tabs import TabRegistry
from .tokens import RegistrationTokens
from .workers import (
    AdoptedListener,
    KeepSocketsReactor,
    Lifeline,
    ReusePortListener,
    WorkerPool,
    WorkerRole,
    accept_in_turn,
    reuse_port_for,
)

log = Logger()
DAY = 86400.0
OPEN_FILES_CEILING = 1 << 20  # Linux's default fs.nr_open, for an unlimited hard limit


def raise_open_files_limit(rlimit=None) -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit: each stream holds two sockets.

    Soft limits are often 1024 while the hard one allows far more; an unprivileged
    process may raise its own soft limit that far. Returns (before, after).
    """
    if rlimit is None:
        import resource as rlimit
    soft, hard = rlimit.getrlimit(rlimit.RLIMIT_NOFILE)
    wanted = OPEN_FILES_CEILING if hard == rlimit.RLIM_INFINITY else hard
    if soft != rlimit.RLIM_INFINITY and soft < wanted:
        try:
            rlimit.setrlimit(rlimit.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError) as e:
            log.warn("could not raise the open-files limit from {soft} to {wanted}: {why}",
                     soft=soft, wanted=wanted, why=e)
            return soft, soft
        return soft, wanted
    return soft, soft


@frozen
class LastPrune:
    at: float
    ok: bool
    removed: int


class Pruner:
    """One pruning pass; it logs its own errors so the timer never stops."""

    def __init__(self, store, clock, days: float, *, metrics: Metrics | None = None) -> None:
        self.store = store
        self.clock = clock
        self.days = days
        self.metrics = metrics
        self.running: Deferred | None = None
        self.last: LastPrune | None = None  # for the status page

    def __call__(self) -> None:
        """Start a pass unless one is running; ``self.running`` fires with {domain: count}.

        The timer is not handed the Deferred: a slow pass is skipped over, not queued,
        and the timer must not swallow the result that tests and callers await.
        """
        if self.days <= 0 or self.running is not None:
            return
        self.running = self._run()
        self.running.addBoth(self._finished)

    def _finished(self, result):
        self.running = None
        return result

    @inlineCallbacks
    def _run(self):
        started = self.clock.seconds()
        try:
            pruned = yield self.store.prune(started - self.days * DAY)
        except Exception:
            log.failure("pruning failed; will try again at the next interval")
            if self.metrics is not None:
                self.metrics.pruning_failed()
            self.last = LastPrune(started, ok=False, removed=0)
            return {}
        self.last = LastPrune(started, ok=True, removed=sum(pruned.values()))
        if self.metrics is not None:
            self.metrics.pruned(pruned)
        if pruned:
            log.info("pruned {total} idle sessions: {per_domain}",
                     total=sum(pruned.values()), per_domain=pruned)
        return pruned


class _ProbeService(TimerService):
    """The probe timer; probes still out when the daemon stops are cancelled."""

    def stopService(self):
        self.call[0].stop()
        return super().stopService()


class _ConnectionPoolService(Service):
    """Closes the bridge connections we keep open when the daemon stops."""

    def __init__(self, pool) -> None:
        self.pool = pool

    def stopService(self):
        super().stopService()
        return self.pool.closeCachedConnections()


def make_store(config: GatewayConfig, reactor):
    return open_store(config, reactor)


class Listener(StreamServerEndpointService):
    """One ``--listen`` endpoint that says where it listens, so ``tcp:0`` is usable."""

    def __init__(self, endpoint, factory, *, shared: bool = False) -> None:
        super().__init__(endpoint, factory)
        self._raiseSynchronously = True  # see GatewayService
        self.port = None  # the IListeningPort, once bound
        self.shared = shared  # handed on to --workers processes too

    def privilegedStartService(self) -> None:
        super().privilegedStartService()
        bound = self._waitingForPort  # set by the call above
        assert bound is not None
        bound.addCallback(self._bound)

    def _bound(self, port):
        self.port = port
        if self.shared:
            accept_in_turn(port)
        log.info("listening on {address}", address=port.getHost())
        return port


class GatewayService(MultiService):
    """The daemon: a port it cannot listen on stops it at once, in one line.

    twistd calls privilegedStartService before the reactor runs; listening there (the
    listeners raise synchronously) turns "address already in use" into exit status 1
    instead of a logged traceback and a daemon that serves nothing.
    """

    def privilegedStartService(self) -> None:
        try:
            super().privilegedStartService()
        except CannotListenError as e:
            where = f"{e.interface or '*'}:{e.port}"
            why = getattr(e.socketError, "strerror", None) or e.socketError
            raise SystemExit(f"lmgateway: --listen: cannot listen on {where}: {why}") from None


def make_service(config: GatewayConfig, reactor, *, client=None, store=None,
                 worker: WorkerRole | None = None, environ=None) -> MultiService:
    """The daemon; ``worker`` says which of ``--workers`` processes this is (None: the
    parent, or the only one); ``environ`` is what the parent's workers inherit."""
    root = GatewayService()
    if worker is None and config.workers > 1:
        worker = WorkerRole(0, config.workers)
    parent = worker is None or worker.parent
    if store is None:
        store = make_store(config, reactor)
    store.setName("store")
    store.setServiceParent(root)
    if client is None:
        client, pool = make_http_client(reactor, config)
        pool_service = _ConnectionPoolService(pool)
        pool_service.setName("bridge-connections")
        pool_service.setServiceParent(root)

    # One registry per gateway, shared by the routes, the proxy and the pruner.
    metrics = Metrics(store, config.domains)
    pruning = Pruner(store, reactor, config.cleanup_days, metrics=metrics)
    if parent:  # one pruner for all workers: they share the store
        pruner = TimerService(config.cleanup_interval, pruning)
        pruner.clock = reactor
        pruner.setName("pruner")
        pruner.setServiceParent(root)

    secrets = secret_source(config, store)
    tokens = RegistrationTokens(secrets, reactor)
    tokens.setName("registration-tokens")
    tokens.setServiceParent(root)
    keys = ClientKeyService(config.api_keys_file, config.api_keys, reactor)
    if not keys.current.required:
        log.warn("no client API keys configured: /v1 is open to anyone who can reach this "
                 "gateway (set --api-keys-file or GATEWAY_API_KEYS)")
    if not config.admin_token:
        log.info("no admin token configured: admin routes answer loopback clients only")

    tabs: TabRegistry | None = None
    if worker is None:
        # A tab long-polls one process: with several workers its session's requests
        # could land on another, so tab mode is off (docs/performance.rst).
        tabs = TabRegistry(reactor, queue_limit=config.tab_queue,
                           poll_timeout=config.tab_poll_timeout, metrics=metrics)
        tabs.setName("tabs")
        tabs.setServiceParent(root)
        metrics.watch_tabs(tabs, config.domains)
    else:
        log.info("worker {index} of {count} (pid {pid}); tab mode is off with --workers > 1",
                 index=worker.index, count=worker.count, pid=os.getpid())
    # The status page's bridge probe: a few seconds between ticks, a minute per bridge.
    prober = BridgeProber(config, store, client, reactor, interval=config.probe_interval)
    if config.probe_interval > 0:
        probing = _ProbeService(PROBE_TICK, prober)
        probing.clock = reactor
        probing.setName("bridge-probe")
        probing.setServiceParent(root)
    status = StatusPages.build(config, store, reactor, tokens=tokens, prober=prober,
                               pruner=pruning,
                               tabs=RegistryTabs(tabs, config) if tabs is not None else None)

    bodies = Bodies()
    if config.body_workers > 0:
        parsers = BodyPool(reactor, config.body_workers, timeout=config.body_parse_timeout)
        parsers.setName("body-parsers")
        parsers.setServiceParent(root)
        bodies = Bodies(parsers)
    gateway = Gateway(config, store, client, reactor, tokens=tokens, client_keys=keys,
                      metrics=metrics, tabs=tabs, status=status, bodies=bodies,
                      worker=worker)
    reloader = SighupReloader(reactor, keys=keys, admin=gateway.admin,
                              admin_token_file=config.admin_token_file)
    reloader.setName("sighup")
    reloader.setServiceParent(root)
    site = make_site(gateway)
    if worker is not None and not worker.parent:
        # The parent's sockets, inherited; the parent's pipe says when to stop.
        lifeline = Lifeline(reactor)
        lifeline.setName("lifeline")
        lifeline.setServiceParent(root)
        adopted: list[Service] = [AdoptedListener(reactor, fd, site) for fd in worker.fds]
        adopted += [ReusePortListener(reactor, spec, site) for spec in worker.reuse]
        for index, service in enumerate(adopted):
            service.setName(f"listen-{index}")
            service.setServiceParent(root)
        return root
    listeners: list[Service] = []
    for index, description in enumerate(config.listen):
        reuse = reuse_port_for(description) if worker is not None else None
        listener: Service = Listener(serverFromString(KeepSocketsReactor(reactor), description),
                                     site,
                                     shared=worker is not None and worker.count > 1) \
            if reuse is None else ReusePortListener(reactor, reuse, site)
        listener.setName(f"listen-{index}")
        listener.setServiceParent(root)
        listeners.append(listener)
    if worker is not None:
        # Started after the listeners are bound, stopped before they close.
        pool = WorkerPool(reactor, config, listeners, environ=environ or {})
        pool.setName("workers")
        pool.setServiceParent(root)
    if not config.log_requests:
        log.info("request logging is off (--log-requests turns it on)")
    return root
