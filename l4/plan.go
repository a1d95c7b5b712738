package l4

import (
	"net/netip"
	"slices"
	"sync/atomic"

	"github.com/l4lb/l4lb/config"
)

// Plan is the choice a service makes from its config alone, with every weighted backend
// healthy; tests and operators use it to predict where a client lands. Backups are
// then out of the route, unless no primary has weight > 0.
//
// A Plan builds the same Maglev table as the data path (same members, keys and
// size), and Maglev depends only on the set of backends, so its answer is the
// one every l4lb node with this config gives while all weighted backends are
// healthy. A Plan is immutable and safe for concurrent use.
type Plan struct {
	hashKey config.HashKey
	addrs   []netip.AddrPort // member index -> backend address
	table   *maglev          // nil unless the service balances with Maglev
}

// NewPlan computes the plan of svc. For a Maglev service this builds a full
// table (a millisecond or so); for the others it is cheap.
func NewPlan(svc *config.Service) *Plan {
	p := &Plan{hashKey: svc.HashKey}
	if svc.Balance != config.Maglev {
		return p
	}
	// The route's tier with every backend healthy (choose): the weighted
	// primaries, or the backups when every primary has weight 0.
	backups := !slices.ContainsFunc(svc.Backends, func(b config.Backend) bool { return b.Weight > 0 && !b.Backup })
	members := make([]member, 0, len(svc.Backends))
	for _, b := range svc.Backends {
		if b.Weight <= 0 || b.Backup != backups {
			continue
		}
		p.addrs = append(p.addrs, b.Address)
		members = append(members, member{
			key:    b.Address.String(),
			weight: b.Weight,
			active: new(atomic.Int64),
		})
	}
	p.table = newMaglev(members, DefaultMaglevSize)
	return p
}

// First returns the backend a new connection from client goes to first; false when no
// backend has weight > 0.
//
// Only config.Maglev has an answer that follows from the config: round_robin
// depends on how many connections came before and least_conn on the open
// connections of each backend, so for those First always returns false rather
// than a guess that the data path would not honour.
func (p *Plan) First(client netip.AddrPort) (netip.AddrPort, bool) {
	if p.table == nil {
		return netip.AddrPort{}, false
	}
	i := p.table.pick(clientKey(client, p.hashKey), nil)
	if i < 0 {
		return netip.AddrPort{}, false
	}
	return p.addrs[i], true
}
