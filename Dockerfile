# The kvs image: one statically linked binary and nothing else.
#
# No base image can be pulled here, so nothing is compiled inside Docker: build with
#
#   deploy/image.sh            # cargo build (static) + docker build -t kvs .
#
# which puts the binary at target/docker/kvs, the only file the build context holds
# (see .dockerignore).
FROM scratch
COPY target/docker/kvs /kvs
# The node's keys, log and view; mount a volume here to keep them across containers.
ENV DATA_DIR=/data
VOLUME /data
# 8080 for the seed 000/001/002 dialects, 13800 for the seed 003 family.
EXPOSE 8080 13800
ENTRYPOINT ["/kvs"]
