package orchestratortest

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/etcdworker/orchestrator/internal/embedetcd"
	"github.com/etcdworker/orchestrator/internal/etcdtest"
)

// clusterSeq makes cluster tokens unique within the process.
var clusterSeq atomic.Int64

// StartCluster starts a size-member etcd cluster on free 127.0.0.1 ports and
// returns it once every member serves clients. Endpoints lists every member
// and the kit's clients use all of them. ctx bounds the start only. The
// caller must Close it.
func StartCluster(ctx context.Context, size int, opts ...Option) (*Etcd, error) {
	return start(ctx, size, opts)
}

// cluster is the running members of a multi-member cluster and the proxies
// in front of their peer ports.
//
// Members talk to each other through the proxies (they advertise the
// proxies' addresses). etcd does not close the peer connections it accepted
// when it stops, so without the proxies, whose Close cuts every connection,
// the peer HTTP connections between stopped members would outlive them.
type cluster struct {
	members []*embedetcd.Server
	proxies []*etcdtest.Proxy
}

// close stops the members, then the proxies.
//
// Each member's peer proxy is closed right before the member: etcd's stop
// waits up to a second for the peer connections it accepted to go idle,
// which raft's streams never do. The raft leader is stopped last, once it has
// stepped down for lack of a quorum (about one election timeout): a leader
// stopped while it still believes a peer to be alive tries to hand leadership
// over to it and waits for etcd's request timeout (several seconds).
func (c cluster) close() {
	lead := -1
	for i, m := range c.members {
		if es := m.Etcd().Server; len(c.members) > 1 && es.Lead() == uint64(es.MemberID()) {
			lead = i
			continue
		}
		c.closeMember(i)
	}
	if lead >= 0 {
		es := c.members[lead].Etcd().Server
		deadline := time.Now().Add(4 * time.Duration(embedetcd.DefaultElectionMs) * time.Millisecond)
		for es.Lead() == uint64(es.MemberID()) && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		c.closeMember(lead)
	}
	for _, p := range c.proxies {
		p.Close()
	}
}

func (c cluster) closeMember(i int) {
	if i < len(c.proxies) {
		c.proxies[i].Close()
	}
	c.members[i].Close()
}

// startCluster launches size members with their data under dir and waits
// until they are ready. A launch that loses a port race is retried with
// fresh ports; on error nothing is left running.
func startCluster(ctx context.Context, dir string, size int, opts []embedetcd.Option) (cluster, error) {
	var lastErr error
	for attempt := range 6 {
		c, err := launchCluster(filepath.Join(dir, fmt.Sprintf("try%d", attempt)), size, opts)
		if err != nil {
			lastErr = err
			if embedetcd.IsAddrInUse(err) {
				continue
			}
			return cluster{}, err
		}
		rctx, cancel := context.WithTimeout(ctx, embedetcd.ResolveOptions(opts...).ReadyTimeout)
		for _, m := range c.members {
			if err = m.WaitReady(rctx); err != nil {
				break
			}
		}
		cancel()
		if err != nil {
			c.close()
			return cluster{}, err
		}
		return c, nil
	}
	return cluster{}, fmt.Errorf("giving up after repeated port conflicts: %w", lastErr)
}

// launchCluster starts the members without waiting for a quorum. On error
// nothing is left running.
func launchCluster(dir string, size int, opts []embedetcd.Option) (c cluster, err error) {
	defer func() {
		if err != nil {
			c.close()
		}
	}()
	ms := make([]embedetcd.Member, size)
	initial := make([]string, size)
	token := fmt.Sprintf("orchestratortest-%d-%d", time.Now().UnixNano(), clusterSeq.Add(1))
	for i := range ms {
		curl, err := embedetcd.PickURL()
		if err != nil {
			return c, err
		}
		purl, err := embedetcd.PickURL()
		if err != nil {
			return c, err
		}
		proxy, err := etcdtest.StartProxy(purl)
		if err != nil {
			return c, err
		}
		c.proxies = append(c.proxies, proxy)
		name := fmt.Sprintf("m%d", i)
		ms[i] = embedetcd.Member{
			Name: name, Dir: filepath.Join(dir, name), ClusterToken: token,
			ClientURL: curl, PeerURL: purl, AdvertisePeerURL: proxy.Endpoint(),
		}
		initial[i] = name + "=" + proxy.Endpoint()
	}
	for _, m := range ms {
		m.InitialCluster = strings.Join(initial, ",")
		s, err := embedetcd.Launch(m, opts...)
		if err != nil {
			return c, err
		}
		c.members = append(c.members, s)
	}
	return c, nil
}
