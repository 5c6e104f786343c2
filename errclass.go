package orchestrator

import (
	"errors"
	"fmt"
	"strings"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// rejected returns the error Run must end with when etcd answered request
// (a load, a watch, a commit) with a rejection that retrying cannot heal, or
// nil when err is transient (unavailability, a timeout, a lost leader) and
// the request is to be retried. The load, the watch and the commit all
// classify with it; see "Error classes" in docs/DESIGN.md.
func rejected(client *clientv3.Client, request string, err error) error {
	if err == nil {
		return nil
	}
	if clientClosed(client) {
		return fmt.Errorf("%w: %s: the etcd client is closed: %w", ErrEtcdRejected, request, err)
	}
	if permanentEtcdError(err) {
		return fmt.Errorf("%w: %s: %w", ErrEtcdRejected, request, err)
	}
	return nil
}

// clientClosed reports whether client was closed (nil: not known).
func clientClosed(client *clientv3.Client) bool {
	return client != nil && client.Ctx() != nil && client.Ctx().Err() != nil
}

// permanentEtcdError reports whether err is an answer of etcd (or of gRPC on
// its behalf) that the same request will get again.
func permanentEtcdError(err error) bool {
	for _, p := range []error{
		rpctypes.ErrPermissionDenied, rpctypes.ErrAuthFailed, rpctypes.ErrUserEmpty,
		rpctypes.ErrUserNotFound, rpctypes.ErrRoleNotGranted, rpctypes.ErrPermissionNotGranted,
		rpctypes.ErrDuplicateKey, rpctypes.ErrEmptyKey, rpctypes.ErrKeyNotFound,
		rpctypes.ErrInvalidSortOption, rpctypes.ErrRequestTooLarge, rpctypes.ErrTooManyOps,
	} {
		if errors.Is(err, p) {
			return true
		}
	}
	// Errors etcd's server knows arrive as rpctypes.EtcdError (above); a raw
	// gRPC status comes from gRPC itself, such as a request or a response
	// over a receive limit.
	if s, ok := status.FromError(err); ok {
		switch s.Code() {
		case codes.PermissionDenied, codes.Unauthenticated, codes.InvalidArgument:
			return true
		case codes.ResourceExhausted:
			return strings.Contains(s.Message(), "larger than max")
		}
	}
	return false
}

// commitRejected is rejected for a commit Txn, with the rejections the
// worker's own limits explain mapped to their sentinels.
func commitRejected(client *clientv3.Client, err error) error {
	switch {
	case errors.Is(err, rpctypes.ErrTooManyOps):
		return fmt.Errorf("%w: the server's --max-txn-ops is lower than the worker's limit: %w", ErrEtcdTxnOpsExceed, err)
	case errors.Is(err, rpctypes.ErrRequestTooLarge), isMessageTooLarge(err):
		return fmt.Errorf("%w: the server's --max-request-bytes is lower than the worker's limit: %w", ErrEtcdTxnSizeExceed, err)
	case isLeaseNotFound(err):
		return fmt.Errorf("%w: %w", ErrEtcdSessionDone, err)
	}
	return rejected(client, "commit", err)
}

func isMessageTooLarge(err error) bool {
	s, ok := status.FromError(err)
	return ok && s.Code() == codes.ResourceExhausted && strings.Contains(s.Message(), "larger than max")
}
