from train.data.phantom.layout import main

main()
