package l4

import (
	"github.com/prometheus/client_golang/prometheus"

	"github.com/l4lb/l4lb/config"
	"github.com/l4lb/l4lb/health"
)

// Metrics exports a Server's counters to Prometheus. It reads the same
// atomics the status view reads, when scraped: the data path only ever
// adds to atomics, and nothing is registered or removed per backend as
// configs come and go.
//
//	reg := prometheus.NewRegistry()
//	reg.MustRegister(l4.NewMetrics(srv))
type Metrics struct {
	srv *Server

	configVersion, configLoaded                     *prometheus.Desc
	accepted, refused, proxyErrors                  *prometheus.Desc
	active, total, failed, bytes, connectTime       *prometheus.Desc
	weight, up, healthy, draining, drainingConns    *prometheus.Desc
	transitions, healthRebuilds, routingToBackups   *prometheus.Desc
	backup                                          *prometheus.Desc
	udpDatagrams, udpBytes, udpFlows, udpFlowEvents *prometheus.Desc
	udpDrops                                        *prometheus.Desc
	rejected, openConns, maxConns                   *prometheus.Desc
}

var _ prometheus.Collector = (*Metrics)(nil)

// NewMetrics returns a collector for srv.
func NewMetrics(srv *Server) *Metrics {
	svc := []string{"service"}
	be := []string{"service", "backend"}
	d := func(name, help string, labels ...string) *prometheus.Desc {
		return prometheus.NewDesc("l4lb_"+name, help, labels, nil)
	}
	return &Metrics{
		srv:              srv,
		configVersion:    d("config_version", "Version of the running config: 1 at start, +1 per applied reload."),
		configLoaded:     d("config_loaded_timestamp_seconds", "When the running config was applied, in Unix seconds."),
		accepted:         d("connections_accepted_total", "TCP connections accepted.", svc...),
		refused:          d("connections_refused_total", "Client connections closed at once because no backend could take them (none routable, or every tried backend failed to connect).", svc...),
		proxyErrors:      d("connections_errors_total", "Proxied connections that ended with an error (reset, broken pipe) rather than a close or the idle timeout.", svc...),
		active:           d("backend_connections_active", "Open proxied TCP connections (UDP: open flows) per backend.", be...),
		total:            d("backend_connections_total", "Proxied TCP connections (UDP: flows) opened per backend.", be...),
		failed:           d("backend_connect_failures_total", "Connect attempts to the backend that failed or timed out.", be...),
		bytes:            d("backend_bytes_total", "Bytes moved, by direction: to_backend (from clients) or to_client.", append(be, "direction")...),
		connectTime:      d("backend_connect_duration_seconds", "Time to connect to the backend, for successful connects.", be...),
		weight:           d("backend_weight", "Configured weight; 0 for a removed backend that is still draining.", be...),
		up:               d("backend_up", "1 when the backend takes new connections (weighted, healthy and in the routing table), else 0.", be...),
		healthy:          d("backend_healthy", "1 when the backend passes its health checks (every backend, when the service has none), else 0: down, not probed yet, or removed. Unlike backend_up, 1 for a healthy backup that the primaries keep out of the routing table.", be...),
		draining:         d("backend_draining", "1 while the backend drains (removed or weight 0, with connections open).", be...),
		drainingConns:    d("draining_connections", "Open connections to draining backends.", svc...),
		transitions:      d("backend_health_transitions_total", "Health state changes, by the state entered.", append(be, "to")...),
		healthRebuilds:   d("health_table_rebuilds_total", "Routing table rebuilds caused by health changes.", svc...),
		routingToBackups: d("service_routing_to_backups", "1 while no primary backend is usable and new connections go to the backups (backup = true), else 0.", svc...),
		backup:           d("backend_backup", "1 for a backup backend (backup = true), which takes new connections only while no primary is usable, else 0.", be...),
		udpDatagrams:     d("udp_datagrams_total", "UDP datagrams forwarded, by direction.", append(svc, "direction")...),
		udpBytes:         d("udp_bytes_total", "UDP payload bytes forwarded, by direction.", append(svc, "direction")...),
		udpFlows:         d("udp_flows_active", "Open UDP flows.", svc...),
		udpFlowEvents:    d("udp_flows_total", "UDP flow events: created, expired (idle), answered (replies_per_datagram), closed (drain, error), refused (max_flows), handed_over and taken_over (a binary upgrade passed the flow, socket and all).", append(svc, "event")...),
		udpDrops:         d("udp_drops_total", "UDP datagrams dropped, by reason.", append(svc, "reason")...),
		rejected:         d("connections_rejected_total", "TCP clients closed before reaching a backend by a limit, an access list or the PROXY protocol checks, by reason.", append(svc, "reason")...),
		openConns:        d("open_connections", "TCP connections open over all services, against max_connections."),
		maxConns:         d("max_connections", "Bound on open TCP connections over all services, from RLIMIT_NOFILE; at it l4lb stops accepting until one closes."),
	}
}

// Describe sends every metric description.
func (m *Metrics) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{
		m.configVersion, m.configLoaded, m.accepted, m.refused, m.proxyErrors, m.active, m.total, m.failed,
		m.bytes, m.connectTime, m.weight, m.up, m.healthy, m.draining, m.drainingConns, m.transitions, m.healthRebuilds,
		m.routingToBackups, m.backup,
		m.udpDatagrams, m.udpBytes, m.udpFlows, m.udpFlowEvents, m.udpDrops, m.rejected, m.openConns, m.maxConns,
	} {
		ch <- d
	}
}

// Collect reads the counters.
func (m *Metrics) Collect(ch chan<- prometheus.Metric) {
	st := m.srv.Status()
	gauge := func(d *prometheus.Desc, v float64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.GaugeValue, v, labels...)
	}
	counter := func(d *prometheus.Desc, v uint64, labels ...string) {
		ch <- prometheus.MustNewConstMetric(d, prometheus.CounterValue, float64(v), labels...)
	}
	gauge(m.configVersion, float64(st.Version))
	if st.MaxConnections > 0 {
		gauge(m.openConns, float64(st.OpenConnections))
		gauge(m.maxConns, float64(st.MaxConnections))
	}
	if !st.LoadedAt.IsZero() {
		gauge(m.configLoaded, float64(st.LoadedAt.UnixNano())/1e9)
	}
	for _, s := range st.Services {
		name := s.Name
		if s.Protocol == config.TCP {
			counter(m.accepted, s.Accepted, name)
			for r := RejectReason(0); r < NumRejectReasons; r++ {
				counter(m.rejected, s.Rejected[r], name, r.String())
			}
		}
		counter(m.refused, s.Refused, name)
		counter(m.proxyErrors, s.ProxyErrors, name)
		counter(m.healthRebuilds, s.HealthRebuilds, name)
		gauge(m.routingToBackups, boolGauge(s.RoutingToBackups), name)
		var drainingConns int64
		for _, b := range s.Backends {
			addr := b.Address.String()
			gauge(m.active, float64(b.Active), name, addr)
			counter(m.total, b.Total, name, addr)
			counter(m.failed, b.DialFailed, name, addr)
			counter(m.bytes, b.BytesToBack, name, addr, "to_backend")
			counter(m.bytes, b.BytesToCli, name, addr, "to_client")
			gauge(m.weight, float64(b.Weight), name, addr)
			gauge(m.backup, boolGauge(b.Backup), name, addr)
			gauge(m.up, boolGauge(b.InRoute), name, addr)
			// A removed backend is no longer probed: its last state would
			// go stale.
			gauge(m.healthy, boolGauge(b.Configured && b.Health.Status.State == health.Up), name, addr)
			gauge(m.draining, boolGauge(b.Draining), name, addr)
			if b.Draining || !b.Configured {
				drainingConns += b.Active
			}
			counter(m.transitions, b.Health.WentUp, name, addr, "up")
			counter(m.transitions, b.Health.WentDown, name, addr, "down")
			if s.Protocol == config.TCP {
				buckets, count, sum := b.connectTime.snapshot()
				ch <- prometheus.MustNewConstHistogram(m.connectTime, count, sum, buckets, name, addr)
			}
		}
		gauge(m.drainingConns, float64(drainingConns), name)
		if u := s.UDP; u != nil {
			counter(m.udpDatagrams, u.DatagramsToBackend, name, "to_backend")
			counter(m.udpDatagrams, u.DatagramsToClient, name, "to_client")
			counter(m.udpBytes, u.BytesToBackend, name, "to_backend")
			counter(m.udpBytes, u.BytesToClient, name, "to_client")
			gauge(m.udpFlows, float64(u.FlowsActive), name)
			counter(m.udpFlowEvents, u.FlowsCreated, name, "created")
			counter(m.udpFlowEvents, u.FlowsExpired, name, "expired")
			counter(m.udpFlowEvents, u.FlowsAnswered, name, "answered")
			counter(m.udpFlowEvents, u.FlowsClosed, name, "closed")
			counter(m.udpFlowEvents, u.FlowsRefused, name, "refused")
			counter(m.udpFlowEvents, u.FlowsHandedOver, name, "handed_over")
			counter(m.udpFlowEvents, u.FlowsTakenOver, name, "taken_over")
			for r := DropReason(0); r < NumDropReasons; r++ {
				counter(m.udpDrops, u.Drops[r], name, r.String())
			}
		}
	}
}

func boolGauge(b bool) float64 {
	if b {
		return 1
	}
	return 0
}
