package orchestrator

import (
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/etcdworker/orchestrator/internal/etcderr"
)

// errClientClosed is the cause of the rejection a closed client makes when
// no request failed yet (a wait saw the client's context end). It is no
// context error: Run's own ctx is alive, and a caller that takes
// context.Canceled for a requested stop must not take this for one.
var errClientClosed = errors.New("no request can be sent")

// rejected returns the error Run must end with when etcd answered request
// (a load, a watch, a commit) with a rejection that retrying cannot heal, or
// nil when err is transient (unavailability, a timeout, a lost leader) and
// the request is to be retried. The load, the watch and the commit all
// classify with it; see "Error classes" in docs/DESIGN.md.
func rejected(client *clientv3.Client, request string, err error) error {
	if err == nil || !etcderr.EndsRetries(client, err) {
		return nil
	}
	if etcderr.ClientClosed(client) {
		return fmt.Errorf("%w: %s: the etcd client is closed: %w", ErrEtcdRejected, request, err)
	}
	return fmt.Errorf("%w: %s: %w", ErrEtcdRejected, request, err)
}

// commitRejected is rejected for a commit Txn, with the rejections the
// worker's own limits explain mapped to their sentinels.
func commitRejected(client *clientv3.Client, err error) error {
	switch {
	case errors.Is(err, rpctypes.ErrTooManyOps):
		return fmt.Errorf("%w: the server's --max-txn-ops is lower than the worker's limit: %w", ErrEtcdTxnOpsExceed, err)
	case errors.Is(err, rpctypes.ErrRequestTooLarge), etcderr.MessageTooLarge(err):
		return fmt.Errorf("%w: the server's --max-request-bytes is lower than the worker's limit: %w", ErrEtcdTxnSizeExceed, err)
	case etcderr.LeaseNotFound(err):
		return fmt.Errorf("%w: %w", ErrEtcdSessionDone, err)
	}
	return rejected(client, "commit", err)
}
