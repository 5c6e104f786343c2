package util_test

import "github.com/etcdworker/orchestrator/util"

// The API contract lists these signatures, which are those of TiCDC's
// pkg/orchestrator/util. The assignments fail to compile if one changes.
var (
	_ func(string) util.EtcdKey       = util.NewEtcdKey
	_ func([]byte) util.EtcdKey       = util.NewEtcdKeyFromBytes
	_ func(string) util.EtcdRelKey    = util.NewEtcdRelKey
	_ func([]byte) util.EtcdRelKey    = util.NewEtcdRelKeyFromBytes
	_ func(string) util.EtcdPrefix    = util.NewEtcdPrefix
	_ func([]byte) util.EtcdPrefix    = util.NewEtcdPrefixFromBytes
	_ func(string) util.EtcdRelPrefix = util.NewEtcdRelPrefix
	_ func([]byte) util.EtcdRelPrefix = util.NewEtcdRelPrefixFromBytes
	_ func(string) util.EtcdPrefix    = util.NormalizePrefix

	_ func(util.EtcdKey) string                                  = util.EtcdKey.String
	_ func(util.EtcdKey) []byte                                  = util.EtcdKey.Bytes
	_ func(util.EtcdKey) util.EtcdPrefix                         = util.EtcdKey.Head
	_ func(util.EtcdKey) util.EtcdRelKey                         = util.EtcdKey.Tail
	_ func(util.EtcdKey, *util.EtcdPrefix) util.EtcdRelKey       = util.EtcdKey.RemovePrefix
	_ func(util.EtcdKey) util.EtcdRelKey                         = util.EtcdKey.AsRelKey
	_ func(util.EtcdRelKey) string                               = util.EtcdRelKey.String
	_ func(util.EtcdRelKey) []byte                               = util.EtcdRelKey.Bytes
	_ func(util.EtcdRelKey) util.EtcdRelPrefix                   = util.EtcdRelKey.Head
	_ func(util.EtcdRelKey) util.EtcdRelKey                      = util.EtcdRelKey.Tail
	_ func(util.EtcdRelKey) util.EtcdRelPrefix                   = util.EtcdRelKey.AsPrefix
	_ func(util.EtcdRelKey, *util.EtcdRelPrefix) util.EtcdRelKey = util.EtcdRelKey.RemovePrefix
	_ func(util.EtcdPrefix) string                               = util.EtcdPrefix.String
	_ func(util.EtcdPrefix) []byte                               = util.EtcdPrefix.Bytes
	_ func(util.EtcdPrefix) util.EtcdPrefix                      = util.EtcdPrefix.Head
	_ func(util.EtcdPrefix) util.EtcdRelPrefix                   = util.EtcdPrefix.Tail
	_ func(util.EtcdPrefix, util.EtcdRelKey) util.EtcdKey        = util.EtcdPrefix.FullKey
	_ func(util.EtcdRelPrefix) string                            = util.EtcdRelPrefix.String
	_ func(util.EtcdRelPrefix) []byte                            = util.EtcdRelPrefix.Bytes
	_ func(util.EtcdRelPrefix) util.EtcdRelPrefix                = util.EtcdRelPrefix.Head
	_ func(util.EtcdRelPrefix) util.EtcdRelPrefix                = util.EtcdRelPrefix.Tail
	_ func(util.EtcdRelPrefix) *util.EtcdPrefix                  = util.EtcdRelPrefix.AsPrefix

	// The original declares RemovePrefix on *EtcdRelKey; pointer callers work
	// too.
	_ func(*util.EtcdRelKey, *util.EtcdRelPrefix) util.EtcdRelKey = (*util.EtcdRelKey).RemovePrefix

	// EtcdKey is comparable, so it can be a map key.
	_ map[util.EtcdKey]struct{}
)
