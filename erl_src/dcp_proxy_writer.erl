%% @doc The one process that writes to a connection's socket. A connection process (`dcp_proxy')
%% never sends on a socket itself: it hands what must be written to the writer of that socket and
%% goes on answering callers and firing deadlines while the writer blocks in a send (a peer that
%% stops reading, `send_timeout => infinity').
%%
%% Each write is credited back to its sender, `{'$dcp_written', Writer, Size}', once it is in the
%% socket: the sender counts its unacknowledged bytes and stops reading its own socket while they
%% exceed its bound (`dcp_proxy'), which bounds what waits here. Writes are sent in the order they
%% arrive; a send error ends the writer with `{send_failed, Side, Reason}' (linked: the connection
%% process that started it stops with that reason).
-module(dcp_proxy_writer).

-export([start_link/2, write/3]).

%% at most this many queued writes go out as one send
-define(MAX_BATCH, 16).

%% @doc A writer for `Sock', the socket to `Side''s node, linked to the caller.
-spec start_link(dcp_proxy:socket(), dcp_proxy:side()) -> pid().
start_link(Sock, Side) ->
    spawn_link(fun() -> loop(Sock, Side) end).

%% @doc Queues `IoData' for the socket; `Size' (what the caller accounts it as) comes back in the
%% acknowledgement to the calling process. Never blocks.
-spec write(pid(), iodata(), non_neg_integer()) -> ok.
write(Writer, IoData, Size) ->
    Writer ! {'$dcp_write', self(), IoData, Size},
    ok.

loop(Sock, Side) ->
    receive
        {'$dcp_write', From, IoData, Size} ->
            {Batch, Acks} = more([IoData], #{From => Size}, ?MAX_BATCH - 1),
            case send(Sock, Batch) of
                ok ->
                    Self = self(),
                    maps:foreach(fun(Pid, N) -> Pid ! {'$dcp_written', Self, N} end, Acks),
                    loop(Sock, Side);
                {error, Reason} ->
                    exit({send_failed, Side, Reason})
            end
    end.

%% What else is queued already joins this send (in order).
more(Acc, Acks, 0) ->
    {lists:reverse(Acc), Acks};
more(Acc, Acks, N) ->
    receive
        {'$dcp_write', From, IoData, Size} ->
            more([IoData | Acc], maps:update_with(From, fun(S) -> S + Size end, Size, Acks), N - 1)
    after 0 ->
            {lists:reverse(Acc), Acks}
    end.

send({gen_tcp, S}, Data) -> gen_tcp:send(S, Data);
send({ssl, S}, Data) -> ssl:send(S, Data).
